"""`python -m dro_jax.infer --checkpoint=PATH --prompts=FILE --output=FILE`

Samples one response per prompt from a checkpoint, batched, with a progress bar.
PATH is a dro_jax checkpoint, a training run directory (its latest step) or a
Hugging Face T5 directory. The prompts file is JSONL with a plain-string `prompt` field
(other fields are copied to the output) or plain text, one prompt per line. The output is
JSONL: each input record plus `response`; the fields of a logged response
(`response`, `completion`, feedback, `weight`, `ref_logprob`) move under `logged`.
The prompts file is JSONL when its first non-blank line parses as a JSON object.
`--temperature=0` (the default) decodes greedily; > 0 samples, optionally
restricted by --top_k / --top_p. The vocabulary is the checkpoint's; --vocabulary
supplies one only when the checkpoint records none (a different one is refused). Ids
past the vocabulary are never generated; responses whose text does not encode back to
their tokens are counted on stderr. The output may not be the prompts file, and an
existing one is replaced only with --overwrite.
Ctrl-C or SIGTERM keeps the finished responses in OUTPUT.partial.npz (also saved every 5
minutes), and the same command continues from there, writing what one uninterrupted run
would have; other settings are refused, or start over with --overwrite.
Exit status: 0 done, 1 out of memory while sampling (lower --max_length or
--batch_size), 2 bad input, 130 Ctrl-C, 143 SIGTERM.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import types
from typing import Any, Sequence

import numpy as np


class InputError(ValueError):
    """Bad user input; the message is one line."""


# ---- tokenisation ------------------------------------------------------------------
def tokenize(vocabulary, texts: Sequence[str], length: int) -> tuple[np.ndarray, int]:
    """int32 [N, length]: tokens + EOS, right-padded with 0; also how many were truncated."""
    out = np.zeros((len(texts), length), np.int32)
    truncated = 0
    eos = vocabulary.eos_id
    for i, t in enumerate(texts):
        ids = list(vocabulary.encode(t)) + [eos]
        if len(ids) > length:
            truncated += 1
            ids = ids[:length]
        out[i, :len(ids)] = ids
    return out, truncated


def response_mask(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """[N, L] 1 up to and including the first EOS (everything, when there is none)."""
    tokens = np.asarray(tokens)
    is_eos = tokens == eos_id
    before = np.cumsum(is_eos, axis=1) - is_eos  # EOSes strictly before each position
    return (before == 0).astype(np.int32)


def detokenize(vocabulary, tokens: np.ndarray) -> list[str]:
    """Texts of generated rows, cut at the first EOS."""
    eos = vocabulary.eos_id
    out = []
    for row in np.asarray(tokens).tolist():
        if eos in row:
            row = row[:row.index(eos)]
        out.append(vocabulary.decode([t for t in row if t != 0]))
    return out


# ---- jitted functions, one per network config ---------------------------------------------
@functools.lru_cache(maxsize=16)
def _score_fn(config):
    """jit(params, enc [B,S], tgt [B,L], weights [B,L]) -> [B] summed target log-probs."""
    import jax
    import jax.numpy as jnp

    from dro_jax import losses, network

    module = network.T5(config)

    def score(params, enc, tgt, w):
        dec_in = jnp.concatenate([jnp.full((tgt.shape[0], 1), config.decoder_start_id, jnp.int32), tgt[:, :-1]],
                                 axis=1)
        logits = module.apply({"params": params}, enc, dec_in, enable_dropout=False)
        return (losses.token_logprobs(logits, tgt) * w).sum(-1)

    return jax.jit(score)


@functools.lru_cache(maxsize=16)
def _value_fn(config, kind: str):
    """jit(policy_params, value_params, enc [B,S]) -> [B] V(x), as DROModel computes it."""
    import jax

    from dro_jax import models

    model = models.DROModel(config, value_kind=kind)
    return jax.jit(lambda p, v, t: model.values({"policy": p, "value": v}, {"encoder_input_tokens": t}))


def same_vocabulary_spec(a: str, b: str) -> bool:
    """Whether two vocabulary specs ('byte' or a SentencePiece model file) name one vocabulary:
    the same file (after abspath/realpath) or two files with the same bytes (a checkpoint keeps
    a copy of its run's spiece.model)."""
    import tensorflow as tf

    if a == b:
        return True
    if "byte" in (a, b):
        return False
    if "://" not in a + b and os.path.realpath(os.path.abspath(os.path.expanduser(a))) == \
            os.path.realpath(os.path.abspath(os.path.expanduser(b))):
        return True
    try:
        with tf.io.gfile.GFile(a, "rb") as fa, tf.io.gfile.GFile(b, "rb") as fb:
            return fa.read() == fb.read()
    except (OSError, tf.errors.OpError):  # an unreadable file: not shown to be the same
        return False


def load_checkpoint_and_vocabulary(path: str, vocabulary: str | None = None):
    """(checkpoints.ModelCheckpoint, seqio vocabulary): the one the checkpoint records, checked
    to fit its embedding. `vocabulary` ('byte' or a spiece.model) supplies one when the checkpoint
    records none; one that differs from the recorded vocabulary is refused (InputError), as the
    model would read other ids than it was trained on."""
    from dro_jax import checkpoints
    from dro_jax.data import tasks as data_tasks

    ckpt = checkpoints.load_model_checkpoint(path)
    spec = vocabulary or ckpt.vocabulary_path
    if spec is None:
        raise InputError(f"{path}: checkpoint records no vocabulary; pass --vocabulary")
    vocab = data_tasks.get_vocabulary(spec)  # first: a missing --vocabulary file says so
    if vocabulary and ckpt.vocabulary_path is not None and not same_vocabulary_spec(vocabulary,
                                                                                    ckpt.vocabulary_path):
        raise InputError(f"--vocabulary={vocabulary} differs from the vocabulary {path} records "
                         f"({ckpt.vocabulary_path}); drop --vocabulary to use the checkpoint's")
    data_tasks.check_vocabulary_fits(vocab, ckpt.config.vocab_size, path)
    return ckpt, vocab


def vocabulary_id(vocabulary) -> str:
    """'byte', or a digest of a SentencePiece model's contents (with its extra ids)."""
    import hashlib

    model = getattr(vocabulary, "sp_model", None)
    if model is None:
        return type(vocabulary).__name__
    return f"sentencepiece:{hashlib.sha256(model).hexdigest()[:16]}+{getattr(vocabulary, 'extra_ids', 0)}"


def default_lengths(checkpoint: str, given: dict[str, int | None], fallback: dict[str, int], tool: str,
                    quiet: tuple[str, ...] = ()) -> dict[str, int]:
    """Feature lengths not given on the command line: a training run's own (its recorded
    TASK_FEATURE_LENGTHS, said on stderr), else `fallback`. `given`/`fallback` map 'inputs' and
    'targets' to the --inputs_length/--targets_length values."""
    from dro_jax import checkpoints

    run_dir = checkpoints.run_dir_of(checkpoint)
    meta = checkpoints.read_model_json(run_dir) if run_dir else {}
    recorded = meta.get("feature_lengths") if isinstance(meta, dict) else None
    recorded = recorded if isinstance(recorded, dict) else {}  # a malformed file is loading's to report
    out, taken = {}, []
    for key, value in given.items():
        if value is None and isinstance(recorded.get(key), int):
            value = recorded[key]
            if key not in quiet:  # the caller says it in its own words
                taken.append(f"--{key}_length={value}")
        out[key] = fallback[key] if value is None else value
    if taken:
        print(f"[{tool}] {' '.join(taken)}: the run's TASK_FEATURE_LENGTHS", file=sys.stderr)
    return out


# ---- a loaded policy ------------------------------------------------------------------
class Policy:
    """A checkpoint's policy on one device: batched sampling and sequence log-probs."""

    def __init__(self, config, params, vocabulary, value_params=None):
        import jax

        from dro_jax import network

        self.config = config
        self.vocabulary = vocabulary
        self.module = network.T5(config)
        self.params = jax.device_put(jax.tree_util.tree_map(np.asarray, params))
        self.value_params = value_params
        self._value = None
        self.step = None

    @classmethod
    def load(cls, path: str, vocabulary: str | None = None) -> "Policy":
        ckpt, vocab = load_checkpoint_and_vocabulary(path, vocabulary)
        policy = cls(ckpt.config, ckpt.params, vocab, value_params=ckpt.value_params)
        policy.step = ckpt.step  # a training run's step (None for other checkpoints)
        return policy

    def sample_tokens(self, prompts: Sequence[str], *, inputs_length: int, max_length: int,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64,
                      seed: int = 0, progress: bool = False, desc: str = "infer", first: int = 0,
                      out: np.ndarray | None = None, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
        """(encoder tokens [N, inputs_length], generated tokens [N, max_length]); ids past the
        vocabulary (rows by which the embedding is padded) are never generated. To continue an
        interrupted call, `out` holds its tokens and `first` (a multiple of `batch_size`) how many
        prompts it finished: the rest are sampled as that call would have. `on_batch(done)` is
        called after each batch with the number of prompts finished."""
        import jax
        from tqdm import tqdm

        from dro_jax import decoding

        if first % batch_size and first != len(prompts):
            raise ValueError(f"first={first} is neither a multiple of batch_size={batch_size} nor all the prompts")
        enc, _ = tokenize(self.vocabulary, prompts, inputs_length)
        out = np.zeros((len(prompts), max_length), np.int32) if out is None else out
        rng = jax.random.PRNGKey(seed)
        for _ in range(first // batch_size):  # each batch draws the next key
            rng, _ = jax.random.split(rng)
        with tqdm(total=len(prompts), initial=first, desc=desc, unit="prompt", disable=not progress,
                  file=sys.stderr) as bar:
            for start in range(first, len(prompts), batch_size):
                chunk = enc[start:start + batch_size]
                n = chunk.shape[0]
                if n < batch_size:  # one shape: one compilation
                    chunk = np.pad(chunk, ((0, batch_size - n), (0, 0)))
                rng, sub = jax.random.split(rng)
                toks = decoding.generate(self.module, self.params, chunk, max_length=max_length,
                                         rng=sub, temperature=temperature, top_k=top_k, top_p=top_p,
                                         vocab_size=self.vocabulary.vocab_size)
                out[start:start + n] = np.asarray(jax.device_get(toks))[:n]
                bar.update(n)
                if on_batch is not None:
                    on_batch(start + n)
        return enc, out

    def sample(self, prompts: Sequence[str], **kwargs) -> list[str]:
        _, toks = self.sample_tokens(prompts, **kwargs)
        return detokenize(self.vocabulary, toks)

    def _batches(self, n: int, batch_size: int):
        for start in range(0, n, batch_size):
            yield start, min(n, start + batch_size)

    def logprobs(self, encoder_tokens: np.ndarray, target_tokens: np.ndarray, *, batch_size: int = 64,
                 target_mask: np.ndarray | None = None, progress: bool = False,
                 desc: str = "log-probs") -> np.ndarray:
        """[N] summed log pi(y|x) of target rows (mask: response_mask by default); `progress`: a bar on stderr."""
        import jax
        from tqdm import tqdm

        score = _score_fn(self.config)
        if target_mask is None:
            target_mask = response_mask(target_tokens, self.config.eos_id)
        out = np.zeros((len(encoder_tokens),), np.float32)
        with tqdm(total=len(encoder_tokens), desc=desc, unit="ex", disable=not progress, file=sys.stderr) as bar:
            for s, e in self._batches(len(encoder_tokens), batch_size):
                pad = batch_size - (e - s)
                args = [np.pad(np.asarray(a[s:e]), ((0, pad), (0, 0))) for a in (encoder_tokens, target_tokens)]
                w = np.pad(np.asarray(target_mask[s:e], np.float32), ((0, pad), (0, 0)))
                out[s:e] = np.asarray(jax.device_get(score(self.params, args[0], args[1], w)))[:e - s]
                bar.update(e - s)
        return out

    def values(self, encoder_tokens: np.ndarray, *, batch_size: int = 64) -> np.ndarray | None:
        """[N] V(x) from the checkpoint's value network (separate, shared-encoder head or
        scalar), or None when it has none."""
        import jax

        if self.value_params is None or not jax.tree_util.tree_leaves(self.value_params):
            return None
        if self._value is None:
            from dro_jax import models

            kind = models.value_kind_of(self.value_params)
            if kind is None:
                raise InputError(f"the checkpoint's value params ({sorted(self.value_params)}) are not those of "
                                 "a separate, shared or scalar value network")
            self._value = (_value_fn(self.config, kind),
                           jax.device_put(jax.tree_util.tree_map(np.asarray, self.value_params)))
        fn, value_params = self._value
        out = np.zeros((len(encoder_tokens),), np.float32)
        for s, e in self._batches(len(encoder_tokens), batch_size):
            chunk = np.pad(np.asarray(encoder_tokens[s:e]), ((0, batch_size - (e - s)), (0, 0)))
            out[s:e] = np.asarray(jax.device_get(fn(self.params, value_params, chunk))).reshape(-1)[:e - s]
        return out


# Fields of a feedback log that describe its logged response: stale next to a new response.
RESPONSE_FIELDS = ("response", "completion", "label", "feedback", "reward", "weight", "ref_logprob",
                   "ref_logprob_lengths")


def with_response(record: dict[str, Any], response: str) -> tuple[dict[str, Any], list[str]]:
    """`record` plus the new `response`, its old response's fields under `logged`; the moved names."""
    out = dict(record)
    logged = {k: out.pop(k) for k in RESPONSE_FIELDS if k in record}
    names = sorted(logged)
    if logged and "logged" in out:  # a record inferred before: nest, lose nothing
        logged["logged"] = out.pop("logged")
    if logged:
        out["logged"] = logged
    out["response"] = response
    return out, names


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """One line naming the flag; NaN fails every comparison, so finiteness is checked first."""
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"--temperature must be a finite number >= 0, got {temperature}")
    if top_k < 0:
        raise InputError(f"--top_k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise InputError(f"--top_p must be in (0, 1], got {top_p}")


def count_cut(tokens: np.ndarray, eos_id: int) -> int:
    """Rows of generated tokens [N, L] that reached L without an EOS."""
    return int((~(np.asarray(tokens) == eos_id).any(axis=1)).sum())


def count_not_round_trip(vocabulary, tokens: np.ndarray) -> int:
    """Rows of generated tokens [N, L] whose text is not their tokens: decoding them (up to the
    first EOS) and encoding the text again gives other ids, so the response text differs from
    what was sampled and scored. Byte vocabularies: an incomplete UTF-8 sequence (a lone byte
    184) or the unknown id decode to nothing; SentencePiece: a segmentation other than the
    canonical one, or an id that decodes to nothing."""
    eos = vocabulary.eos_id
    n = 0
    for row in np.asarray(tokens).tolist():
        if eos in row:
            row = row[:row.index(eos)]
        row = [t for t in row if t != 0]
        if list(vocabulary.encode(vocabulary.decode(row))) != row:
            n += 1
    return n


def is_out_of_memory(e: BaseException) -> bool:
    """A host allocation that failed (MemoryError) or XLA's RESOURCE_EXHAUSTED (device memory)."""
    import jax

    return isinstance(e, MemoryError) or (isinstance(e, jax.errors.JaxRuntimeError)
                                           and "RESOURCE_EXHAUSTED" in str(e))


# ---- prompts files -------------------------------------------------------------------
def _check_unicode(value: Any, path: str, line: int, field: str) -> None:
    """Every string in a prompts record (keys too) must be writable as UTF-8: JSON's \\ud800
    escapes decode to lone surrogates, which would fail only when the output is written."""
    from dro_jax.data import logs

    if isinstance(value, str):
        logs._check_text(value, path, line, field)  # pylint: disable=protected-access
    elif isinstance(value, dict):
        for k, v in value.items():
            name = f"{field}.{k}" if field else k
            if isinstance(k, str):
                try:
                    k.encode("utf-8")
                except UnicodeEncodeError:
                    name = f"{field}.{ascii(k)}" if field else ascii(k)
                    logs._check_text(k, path, line, f"{name} (key)")  # pylint: disable=protected-access
            _check_unicode(v, path, line, name)
    elif isinstance(value, list):
        for k, v in enumerate(value):
            _check_unicode(v, path, line, f"{field}[{k}]")


def _check_prompt(obj: dict[str, Any], path: str, line: int) -> None:
    """A JSONL record's `prompt`: a string that is more than whitespace or invisible characters,
    checked as the log reader checks it (`FILE:LINE: prompt: reason`). A message list, which a
    feedback log may hold, is refused: prompts files hold plain strings."""
    from dro_jax.data import logs

    if "prompt" not in obj:
        raise logs.BadRecordError(path, line, "prompt", "missing")
    if isinstance(obj["prompt"], list):
        raise logs.BadRecordError(path, line, "prompt", "expected a string, got a list (a prompts file "
                                  "holds plain-string prompts; message lists are read only in feedback logs)")
    logs._get_str(obj, "prompt", path, line, non_empty=True)  # pylint: disable=protected-access


def _json_record(line: str, path: str, i: int) -> Any:
    """One JSONL line, a key given twice in one object refused as the feedback-log reader refuses
    it (`FILE:LINE: prompt: given twice in one record ...`)."""
    from dro_jax.data import logs

    # pylint: disable=protected-access
    try:
        return json.loads(line, object_pairs_hook=logs._unique_keys)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{i}: record: invalid JSON ({e.msg})") from None
    except logs._DuplicateKeyError as e:
        raise logs.BadRecordError(path, i, logs._duplicate_path(line, e.key),
                                  "given twice in one record (which one is meant?)") from None
    except (ValueError, RecursionError) as e:  # e.g. an integer of over 4300 digits
        raise InputError(f"{path}:{i}: record: invalid JSON ({e})") from None


def _parses_as_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (ValueError, RecursionError):
        return False


def _is_jsonl(lines: list[str]) -> bool:
    """JSONL when the first non-blank line parses as a JSON object. A first line that starts with
    `{` but is not JSON is plain text (`{a, b} is a set; name its size`), unless another line is
    a JSON object: then the file is JSONL whose first record is broken, and reading it says so."""
    if not lines:
        return False
    if _parses_as_object(lines[0]):
        return True
    return lines[0].lstrip().startswith("{") and any(_parses_as_object(l) for l in lines[1:])


def read_prompts(path: str) -> list[dict[str, Any]]:
    """Records with a `prompt`: JSONL objects, or one plain-text prompt per line.

    The file is JSONL when its first non-blank line parses as a JSON object (see `_is_jsonl`).
    Lines end at "\n" only (a trailing "\r" is dropped): U+2028, form feed and the like are
    characters inside a prompt, as in JSON, not line breaks. Whitespace-only lines are skipped;
    a plain-text line of only invisible characters (U+200B) is refused, as in JSONL.
    """
    if not os.path.isfile(path):
        raise InputError(f"{path}: prompts file not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = [l[:-1] if l.endswith("\r") else l for l in f.read().split("\n")]
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    from dro_jax.data import logs

    records = []
    jsonl = _is_jsonl([l for l in lines if l.strip()])
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if jsonl:
            obj = _json_record(line, path, i)
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{i}: record: expected a JSON object with a 'prompt'")
            _check_prompt(obj, path, i)  # the prompt first: it is the one that matters
            _check_unicode(obj, path, i, "")
            records.append(obj)
        else:  # refused as JSONL's `prompt` is: only invisible characters (U+200B) tokenize to nothing
            logs._get_str({"prompt": line}, "prompt", path, i, non_empty=True)  # pylint: disable=protected-access
            records.append({"prompt": line})
    if not records:
        raise InputError(f"{path}: no prompts")
    return records


def _settings(args, policy, prompts: Sequence[str]) -> dict[str, Any]:
    """What decides the samples: an interrupted run continues only under the same."""
    import jax

    from dro_jax import io_utils

    return {"checkpoint": os.path.abspath(args.checkpoint), "step": policy.step,
            "params": io_utils.params_digest(policy.params), "vocabulary": vocabulary_id(policy.vocabulary),
            "platform": jax.default_backend(), "prompts": len(prompts), "prompts_sha256": io_utils.text_digest(prompts),
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "max_length": args.max_length,
            "inputs_length": args.inputs_length, "batch_size": args.batch_size, "seed": args.seed}


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dro_jax.infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompts", required=True, help="JSONL with 'prompt', or plain text lines")
    p.add_argument("--output", required=True, help="JSONL to write")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--max_length", type=int, default=None,
                   help="most response tokens (default: a training run's TASK_FEATURE_LENGTHS targets - 1, "
                        "the room a response has in training next to its end-of-sequence token; else 64)")
    p.add_argument("--inputs_length", type=int, default=None,
                   help="prompt tokens (longer ones are truncated); default: a training run's, else 512")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocabulary", default=None, help="'byte' or a spiece.model (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return p.parse_args(argv)


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    from dro_jax import io_utils

    progress = types.SimpleNamespace(partial=None, rows=None, done=0, first=0, total=0)
    try:
        with io_utils.sigterm_interrupts():  # until the output is written
            return _run(args, progress)
    except KeyboardInterrupt as e:
        if progress.partial is None:
            how = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
            print(f"[infer] stopped by {how}; nothing to keep", file=sys.stderr)
        else:
            how, line = progress.partial.interrupted(e, progress.rows, progress.done, progress.first, tool="infer",
                                                     total=progress.total, unit="prompts")
            print(line, file=sys.stderr)
        return 143 if how == "SIGTERM" else 130


def _run(args, progress) -> int:
    """main's work; `progress` says what an interrupt may keep."""
    from dro_jax import io_utils
    from dro_jax.checkpoints import CheckpointError

    t0 = time.time()
    try:
        check_sampling_args(args.temperature, args.top_k, args.top_p)
        lengths = default_lengths(args.checkpoint, {"inputs": args.inputs_length, "targets": None},
                                  {"inputs": 512, "targets": 0}, "infer", quiet=("targets",))
        args.inputs_length, targets = lengths["inputs"], lengths["targets"]
        if args.max_length is None:  # a response the run's training would not cut (its EOS included)
            args.max_length = targets - 1 if targets > 1 else 64
            if targets > 1:
                print(f"[infer] --max_length={args.max_length}: the run's TASK_FEATURE_LENGTHS targets less "
                      "the end-of-sequence token a feedback log appends", file=sys.stderr)
        if args.max_length < 1 or args.batch_size < 1 or args.inputs_length < 1:
            raise InputError("--max_length, --batch_size and --inputs_length must be positive")
        if os.path.exists(args.output) and os.path.exists(args.prompts) and io_utils.same_file(
                args.output, args.prompts):
            raise InputError(f"--output={args.output} is the --prompts file; write to a new file")
        io_utils.check_new_output(args.output, "--output", overwrite=args.overwrite)
        io_utils.check_writable_file(args.output, "--output")
        records = read_prompts(args.prompts)
        policy = Policy.load(args.checkpoint, args.vocabulary)
        prompts = [r["prompt"] for r in records]
        try:
            _, truncated = tokenize(policy.vocabulary, prompts, args.inputs_length)
            if truncated:
                print(f"[infer] {truncated} of {len(prompts)} prompts are longer than --inputs_length="
                      f"{args.inputs_length} tokens and are truncated", file=sys.stderr)
            partial = io_utils.PartialOutput(args.output, _settings(args, policy, prompts))
            first, tokens = partial.load((len(prompts), args.max_length), np.int32, overwrite=args.overwrite)
            if first:
                print(f"[infer] continuing an interrupted run: {first} of {len(prompts)} prompts were done "
                      f"({partial.path})", file=sys.stderr)
            progress.partial, progress.rows, progress.done, progress.first = partial, tokens, first, first
            progress.total = len(prompts)

            def on_batch(n):
                progress.done = n
                partial.maybe_save(tokens, n)

            policy.sample_tokens(
                prompts, inputs_length=args.inputs_length, max_length=args.max_length,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                batch_size=args.batch_size, seed=args.seed, progress=True, first=first, out=tokens,
                on_batch=on_batch)
        except Exception as e:  # pylint: disable=broad-except
            if not is_out_of_memory(e):
                raise
            # XLA's message is a multi-line traceback; the user needs the flags that size the buffers
            print(f"error: out of memory sampling batches of --batch_size={args.batch_size} prompts x "
                  f"--max_length={args.max_length} tokens (prompts of --inputs_length={args.inputs_length} "
                  "tokens); lower --max_length or --batch_size (or --inputs_length)", file=sys.stderr)
            return 1
        responses = detokenize(policy.vocabulary, tokens)
        cut = count_cut(tokens, policy.config.eos_id)
        if cut:
            print(f"[infer] {cut} of {len(prompts)} responses reached --max_length={args.max_length} "
                  "tokens without an end-of-sequence token and are cut there", file=sys.stderr)
        garbled = count_not_round_trip(policy.vocabulary, tokens)
        if garbled:
            print(f"[infer] {garbled} of {len(prompts)} responses are not their sampled tokens as text "
                  "(decoding and encoding again gives other tokens, e.g. an incomplete UTF-8 sequence "
                  "is dropped); they are written as decoded", file=sys.stderr)
    except (InputError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    from dro_jax.demo.env import write_jsonl

    rows = [with_response(r, resp) for r, resp in zip(records, responses)]
    moved = sorted({k for _, names in rows for k in names})
    if moved:
        print(f"[infer] the prompts' logged-response fields {', '.join(moved)} are kept under 'logged'",
              file=sys.stderr)
    try:
        write_jsonl(args.output, (r for r, _ in rows))  # atomic: nothing half-written is left
    except OSError as e:
        print(f"error: --output={args.output}: cannot write ({e.strerror or e})", file=sys.stderr)
        return 2
    partial.remove()
    n = len(records)
    print(f"[infer] wrote {n} responses to {args.output} in {time.time() - t0:.1f}s "
          f"({math.ceil(n / args.batch_size)} batches)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
