"""`python -m dro_jax.score --checkpoint=PATH --input=LOG [LOG ...] --output=LOG`

Writes the log's records again, each with `ref_logprob`: the summed log-prob of
the response under the checkpoint, with the tokenisation and truncation training
uses (pass the run's --inputs_length/--targets_length; a training run's own are the
default when PATH is one, else 512/256). PATH is a dro_jax
checkpoint, a training run directory, or a Hugging Face T5 directory. A JSONL
record that yields one flat feedback example is written back as it was, plus the
fields; other layouts (UltraFeedback, even with one completion, and TFRecord) are
written as flat feedback records. The output is JSONL, gzipped when its name ends
in .gz; it may not be one of the inputs, nor have a name read as TFRecord, and an
existing output is replaced only with --overwrite.
Ctrl-C or SIGTERM keeps the finished scores in OUTPUT.partial.npz (also saved every 5
minutes), and the same command continues from there; other settings are refused, or start
over with --overwrite.
Exit status: 0 done, 2 bad input, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time


def _input_values(argv):
    """`--input=A B C` as `--input=A --input=B --input=C`: argparse gives an `=` value only the
    one word, and would refuse B and C (this tool takes no positional arguments)."""
    out, after_input = [], False
    for arg in argv:
        if after_input and not arg.startswith("-"):
            out.append(f"--input={arg}")
            continue
        after_input = arg.startswith("--input=")
        out.append(arg)
    return out


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dro_jax.score", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    # `--input A B`, `--input=A B` and `--input A --input B` all read A and B.
    p.add_argument("--input", required=True, nargs="+", action="extend", help="log file(s) or glob(s)")
    p.add_argument("--output", required=True, help="JSONL file to write")
    p.add_argument("--inputs_length", type=int, default=None,
                   help="default: a training run's TASK_FEATURE_LENGTHS inputs (PATH a run), else 512")
    p.add_argument("--targets_length", type=int, default=None,
                   help="default: a training run's TASK_FEATURE_LENGTHS targets (PATH a run), else 256")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--vocabulary", default=None,
                   help="'byte' or a spiece.model (default: the checkpoint's)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the checkpoint's); score in the dtype the run trains in, "
                        "or the log-ratio starts away from 0 by rounding")
    p.add_argument("--format", default="auto")
    p.add_argument("--on_bad_record", default="error", choices=("error", "skip"))
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p.parse_args(_input_values(list(argv)))


def _reads_back(obj, record) -> bool:
    """Whether `obj` with a ref_logprob added is read (auto-detected) as `record` alone, with it."""
    from dro_jax.data import logs

    probe = {**obj, "ref_logprob": -1.0, "ref_logprob_lengths": {"inputs": 1, "targets": 1}}
    try:
        recs = logs.parse_record(probe, record.source, record.line)
    except logs.BadRecordError:
        return False
    fields = lambda r: (r.prompt, r.response, r.reward, r.label, r.weight)
    return len(recs) == 1 and recs[0].ref_logprob is not None and fields(recs[0]) == fields(record)


def _flat_record(r) -> dict:
    """A flat feedback record holding `r`'s fields (one feedback key, as the reader requires)."""
    obj = {"prompt": r.prompt, "response": r.response}
    if r.label is not None:
        obj["label"] = r.label
    else:
        obj["reward"] = r.reward
    if r.id is not None:
        obj["id"] = r.id
    if r.weight is not None:
        obj["weight"] = r.weight
    return obj


class _RawLines:
    """The raw objects of a log's JSONL files, read alongside the records in the same order (a
    second pass that keeps one line at a time, not the whole log)."""

    def __init__(self):
        self._at = {}  # source -> (iterator, (line, obj) read last)

    def get(self, source: str, line: int):
        from dro_jax.data import logs

        it, current = self._at.get(source, (None, None))
        if it is None or (current is not None and current[0] > line):  # not opened, or behind
            it, current = logs.raw_records(source), None
        while current is None or current[0] < line:
            current = next(it, None)
            if current is None:
                break
        self._at[source] = (it, current)
        return current[1] if current is not None and current[0] == line else None


def _original_objects(records):
    """Yields the JSON object to write for each record: the original line's object when it holds
    this one record in a layout whose top-level `ref_logprob` the reader reads back (a flat
    feedback record), else a flat feedback record (UltraFeedback lines, even with one completion;
    TFRecord). Records of one line come together, in file order."""
    import itertools

    from dro_jax.data import logs

    raw = _RawLines()
    for (source, line), group in itertools.groupby(records, key=lambda r: (r.source, r.line)):
        group = list(group)
        obj = raw.get(source, line) if len(group) == 1 and not logs.is_tfrecord(source) else None
        for r in group:
            yield obj if isinstance(obj, dict) and _reads_back(obj, r) else _flat_record(r)


def _check_arguments(*, inputs, output, inputs_length, targets_length, batch_size,
                     overwrite=False) -> list[str]:
    """Refuses bad arguments before anything is read or created; returns the input files."""
    from dro_jax import io_utils
    from dro_jax.data import logs

    for flag, v in (("--inputs_length", inputs_length), ("--targets_length", targets_length),
                    ("--batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"{flag} must be positive, got {v}")
    if logs.is_tfrecord(output):
        raise ValueError(f"--output={output}: score writes JSONL (.jsonl or .jsonl.gz), but readers "
                         "take this name for a TFRecord file; choose a .jsonl name")
    files = logs.expand_paths(inputs)  # refuses a file given twice
    if any(io_utils.same_file(output, f) for f in files):
        # Never rewrite a log in place: skipped lines, non-JSONL layouts and other inputs' records
        # would replace the original for good.
        raise ValueError(f"--output={output} is also an --input; write to a new file")
    io_utils.check_new_output(output, "--output", overwrite=overwrite)
    io_utils.check_writable_file(output, "--output")  # creates nothing
    return files


def score_log(*, checkpoint: str, inputs: list[str], output: str, inputs_length: int = 512,
              targets_length: int = 256, batch_size: int = 32, vocabulary: str | None = None,
              format: str = "auto", on_bad_record: str = "error", progress: bool = True,
              overwrite: bool = False, dtype: str | None = None) -> tuple[int, int]:
    """Scores every record; returns (records written, bad records skipped).

    An existing `output` is refused unless `overwrite`."""
    inputs = _check_arguments(inputs=inputs, output=output, inputs_length=inputs_length,
                             targets_length=targets_length, batch_size=batch_size, overwrite=overwrite)
    import jax
    import numpy as np
    import seqio
    from tqdm import tqdm

    from dro_jax import io_utils, models, sharding
    from dro_jax.data import converters, logs
    from dro_jax.data import tasks as data_tasks
    from dro_jax.infer import load_checkpoint_and_vocabulary, vocabulary_id

    ckpt, vocab = load_checkpoint_and_vocabulary(checkpoint, vocabulary)
    report = logs.ReadReport(max_examples=sys.maxsize)  # every skipped line is named
    records = logs.load_feedback_log(inputs, on_bad_record=on_bad_record, format=format,
                                     report=report)
    if report.num_bad:
        print(f"[score] skipped {report.num_bad} bad records; they are not in {output}:",
              file=sys.stderr)
        for line in report.examples:
            print(f"  {line}", file=sys.stderr)
    name = f"dro_jax_score_{abs(hash((tuple(inputs), vocabulary or ckpt.vocabulary_path, format, on_bad_record)))}"
    # A partly scored log (new feedback appended) is scored again from scratch.
    data_tasks.register_feedback_task(name, paths=list(inputs), vocabulary=vocab, format=format,
                                      on_bad_record=on_bad_record, read_ref_logprobs=False,
                                      overwrite=True)
    lengths = {"inputs": inputs_length, "targets": targets_length}
    # score reports skipped lines and truncation itself, each in full: seqio's summaries would repeat them
    with io_utils.without_absl_messages("Feedback log"), io_utils.without_absl_messages("will be truncated"):
        ds = seqio.get_dataset(name, task_feature_lengths=lengths, dataset_split="train", shuffle=False,
                               num_epochs=1, feature_converter=converters.DROFeatureConverter(pack=False),
                               use_cached=False)
    trunc = data_tasks.get_truncation_stats(name)
    if trunc and trunc.truncated:
        print(f"[score] {trunc.truncated} of {trunc.examples} examples exceed the feature lengths {lengths} "
              "and are truncated, as in training", file=sys.stderr)

    mesh = sharding.create_mesh(sharding.MeshConfig(data=-1, model=1))
    n_dev = mesh.devices.size
    batch_size = int(math.ceil(batch_size / n_dev) * n_dev)
    config = ckpt.config if dtype is None else dataclasses.replace(ckpt.config, dtype=dtype)
    print(f"[score] computing in {config.dtype}", file=sys.stderr)
    model = models.BaseModel(config)
    params = jax.device_put(ckpt.params, sharding.replicated(mesh))
    keys = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")
    score = jax.jit(lambda p, b: model.sequence_logprobs(p, b),
                    in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                    out_shardings=sharding.replicated(mesh))

    # What decides the scores: an interrupted run continues only under the same.
    partial = io_utils.PartialOutput(output, {
        "checkpoint": os.path.abspath(checkpoint), "step": ckpt.step, "params": io_utils.params_digest(ckpt.params),
        "inputs": [os.path.abspath(f) for f in inputs],
        "records": len(records), "records_sha256": io_utils.text_digest(t for r in records for t in (r.prompt, r.response)),
        "inputs_length": inputs_length, "targets_length": targets_length, "dtype": str(config.dtype),
        "vocabulary": vocabulary_id(vocab), "format": format, "devices": n_dev, "platform": jax.default_backend()})
    first, scores = partial.load((len(records),), np.float32, overwrite=overwrite)
    if first:
        print(f"[score] continuing an interrupted run: {first} of {len(records)} records were done ({partial.path})",
              file=sys.stderr)
    done = first
    try:
        with io_utils.sigterm_interrupts():  # until the output is written
            with sharding.use_mesh(mesh), tqdm(total=len(records), initial=first, desc="score", unit="ex",
                                               disable=not progress, file=sys.stderr) as bar:
                for host in ds.skip(first).batch(batch_size).as_numpy_iterator():
                    n = host["encoder_input_tokens"].shape[0]
                    batch = {k: np.pad(host[k], ((0, batch_size - n), (0, 0))) for k in keys}
                    scores[done:done + n] = np.asarray(jax.device_get(score(params, batch)))[:n]
                    done += n
                    bar.update(n)
                    partial.maybe_save(scores, done)
            if done != len(records):
                raise RuntimeError(f"scored {done} examples but read {len(records)} records")
            if not np.all(np.isfinite(scores)):
                bad = int((~np.isfinite(scores)).sum())
                raise ValueError(f"{bad} of {len(scores)} log-probs are not finite under --checkpoint={checkpoint} "
                                 f"in {config.dtype}; nothing was written (float16 overflows easily: try "
                                 "--dtype=bfloat16 or float32)")
            # The lengths go with the scores: training and evaluate refuse them where other lengths cut differently.
            lines = (_json_line({**obj, "ref_logprob": float(s), "ref_logprob_lengths": lengths})
                     for obj, s in zip(_original_objects(records), scores))
            io_utils.write_text_atomically(output, lines, compress=output.endswith(".gz"))
    except KeyboardInterrupt as e:
        raise KeyboardInterrupt(*partial.interrupted(e, scores, done, first, tool="score", total=len(records),
                                                     unit="records")) from None
    partial.remove()
    return len(records), report.num_bad


def _json_line(obj: dict) -> str:
    """One JSONL line, UTF-8 as read; a field the reader does not check may hold a lone surrogate
    (JSON "\\ud800"), which UTF-8 cannot hold: that line keeps it as JSON's escape, losing nothing."""
    text = json.dumps(obj, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj)
    return text + "\n"


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    from dro_jax.checkpoints import CheckpointError
    from dro_jax.data.logs import BadRecordError

    t0 = time.time()
    try:
        from dro_jax.infer import default_lengths

        lengths = default_lengths(args.checkpoint, {"inputs": args.inputs_length, "targets": args.targets_length},
                                  {"inputs": 512, "targets": 256}, "score")
        args.inputs_length, args.targets_length = lengths["inputs"], lengths["targets"]
        n, n_bad = score_log(checkpoint=args.checkpoint, inputs=args.input, output=args.output,
                      inputs_length=args.inputs_length, targets_length=args.targets_length,
                      batch_size=args.batch_size, vocabulary=args.vocabulary, format=args.format,
                      on_bad_record=args.on_bad_record, overwrite=args.overwrite, dtype=args.dtype)
    except (BadRecordError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how, message = e.args if len(e.args) == 2 else ("Ctrl-C", "[score] stopped by Ctrl-C; nothing to keep")
        print(message, file=sys.stderr)
        return 143 if how == "SIGTERM" else 130
    skipped = f" ({n_bad} bad records skipped, listed above)" if n_bad else ""
    print(f"[score] wrote {n} records with ref_logprob to {args.output}{skipped} "
          f"in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
