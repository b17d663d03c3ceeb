"""`python -m dro_jax.infer` and `decoding.generate`: what the CLI samples is what decoding
samples for its flags, its text is its tokens, and bad prompts, vocabularies and sizes stop it
with one line."""
import json
import os
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio
from flax import linen as nn

from dro_jax import checkpoints, decoding, infer, network
from dro_jax.data import logs
from tiny import random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The byte vocabulary's 259 ids in an embedding padded to 384 rows, as gin_configs/models/tiny.gin pads it.
PADDED_BYTE = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                   num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16)
BYTES = seqio.ByteVocabulary().vocab_size  # 259
PROMPTS = ["shout: bako", "ask: dure", "say: zimo", "shout: lepa", "ask: tovi"]
SPM_CORPUS = os.path.join(REPO, "tests", "data", "spm_corpus.txt")


def _cli(*args, timeout=240):
    env = dict(os.environ)
    # one CPU device is enough (and faster) for these tiny runs
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    return subprocess.run([sys.executable, "-m", "dro_jax.infer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.strip().splitlines() if l.startswith("error:")]


def _save(path, config, params, vocabulary_path):
    checkpoints.save_model_checkpoint(str(path), config=config, params=params, vocabulary_path=vocabulary_path)
    return str(path)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(checkpoint path, config, params): a random policy, byte vocabulary, 384 embedding rows."""
    config = network.T5Config(**PADDED_BYTE)
    one = np.ones((1, 4), np.int32)
    shapes = jax.eval_shape(lambda: nn.unbox(network.T5(config).init(jax.random.PRNGKey(0), one, one))["params"])
    params = jax.tree_util.tree_map(np.asarray, random_params(shapes, 0))
    path = _save(tmp_path_factory.mktemp("ckpt") / "model", config, params, checkpoints.BYTE_VOCABULARY)
    return path, config, params


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """Two different SentencePiece models (T5 ids: pad 0, eos 1, unk 2), each < 384 ids."""
    spm = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("spm")
    for name, size in (("a", 200), ("b", 150)):
        spm.SentencePieceTrainer.train(
            input=SPM_CORPUS, model_prefix=str(out / name), vocab_size=size, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    return str(out / "a.model"), str(out / "b.model")


def _generate(config, params, prompts, *, seed, temperature=0.0, top_k=0, top_p=1.0, max_length=8,
              inputs_length=16, batch_size=2, vocab_size=BYTES):
    """What the CLI should sample: decoding.generate over batches of `batch_size` (the last one
    padded), each with the next split of PRNGKey(seed)."""
    enc, _ = infer.tokenize(seqio.ByteVocabulary(), prompts, inputs_length)
    rng = jax.random.PRNGKey(seed)
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = enc[start:start + batch_size]
        n = len(chunk)
        chunk = np.pad(chunk, ((0, batch_size - n), (0, 0)))
        rng, sub = jax.random.split(rng)
        toks = decoding.generate(network.T5(config), params, chunk, max_length=max_length, rng=sub,
                                 temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)
        rows.append(np.asarray(toks)[:n])
    return np.concatenate(rows)


def _round_trips(tokens) -> list[bool]:
    """Per row: the decoded text encodes back to the tokens up to the EOS."""
    vocab = seqio.ByteVocabulary()
    out = []
    for row in np.asarray(tokens).tolist():
        row = row[:row.index(1)] if 1 in row else row
        out.append(list(vocab.encode(vocab.decode(row))) == row)
    return out


# ---- bug 1: ids past the vocabulary; text that is not its tokens ----------------------------------
def test_ids_past_the_vocabulary_are_never_generated(model):
    _, config, params = model
    enc, _ = infer.tokenize(seqio.ByteVocabulary(), PROMPTS * 2, 16)
    module = network.T5(config)
    kw = dict(max_length=24, rng=jax.random.PRNGKey(1), temperature=3.0)
    free = np.asarray(decoding.generate(module, params, enc, **kw))
    assert (free >= BYTES).mean() > 0.1, free  # the padded rows do get sampled when allowed
    for use_cache in (True, False):
        masked = np.asarray(decoding.generate(module, params, enc, vocab_size=BYTES, use_cache=use_cache, **kw))
        assert masked.max() < BYTES, masked
    greedy = np.asarray(decoding.generate(module, params, enc, max_length=24, vocab_size=BYTES))
    assert greedy.max() < BYTES
    # through the policy the CLIs (infer, evaluate, the demo) sample with
    policy = infer.Policy.load(model[0])
    _, toks = policy.sample_tokens(PROMPTS * 2, inputs_length=16, max_length=24, temperature=3.0, batch_size=4)
    assert toks.max() < BYTES and len(np.unique(toks)) > 50, toks
    with pytest.raises(ValueError, match="vocab_size"):
        decoding.generate(module, params, enc, max_length=2, vocab_size=1)


def test_masked_vocabulary_matches_hf_suppress_tokens(tmp_path):
    """Our ids-past-the-vocabulary mask is HF generate's suppress_tokens for those ids."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from dro_jax import hf

    from test_hf_parity import _make_hf_model  # a random v1.1 T5, 96 ids

    hf_model = _make_hf_model("v1.1", seed=1)
    hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
    config, params = hf.load_hf_t5(str(tmp_path))
    enc = np.random.default_rng(0).integers(2, 96, (3, 9))
    enc[1, 5:] = 0
    with torch.no_grad():
        theirs = hf_model.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                                   do_sample=False, num_beams=1, max_new_tokens=10, min_new_tokens=0, use_cache=False,
                                   suppress_tokens=[0, *range(60, 96)]).numpy()[:, 1:]
    theirs = np.pad(theirs, ((0, 0), (0, 10 - theirs.shape[1])))
    ours = np.asarray(decoding.generate(network.T5(config), params, enc, max_length=10, vocab_size=60))
    np.testing.assert_array_equal(ours, theirs)
    assert len(np.unique(theirs)) >= 4 and theirs.max() < 60
    assert np.asarray(decoding.generate(network.T5(config), params, enc, max_length=10)).max() >= 60


def test_count_not_round_trip():
    vocab = seqio.ByteVocabulary()
    rows = [[3 + b for b in "héllo".encode()] + [1],  # round-trips
            [3 + 104, 3 + 184, 3 + 105, 1],  # "h", a lone UTF-8 continuation byte (dropped), "i"
            [3 + 104, 2, 1],  # the unknown id decodes to nothing
            [3 + 104] * 4]  # no EOS: "hhhh" round-trips
    tokens = np.array([r + [0] * (8 - len(r)) for r in rows])
    assert infer.count_not_round_trip(vocab, tokens[:1]) == 0
    assert infer.count_not_round_trip(vocab, tokens) == 2


# ---- bug 7 (and 1, 5): the CLI samples what decoding.generate samples for its flags -------------------
def test_cli_samples_are_decoding_generate_for_the_same_flags(model, tmp_path):
    path, config, params = model
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    runs = {  # name: (seed, temperature, top_k, top_p); three CLI runs, each a process (~10 s)
        "filtered": (3, 1.0, 20, 0.9),
        "seed4": (4, 1.0, 0, 1.0),
        "tiny_temperature": (6, 1e-39, 0, 1.0),
    }
    texts, expected, garbled = {}, {}, {}
    for name, (seed, t, k, p) in runs.items():
        out = tmp_path / f"{name}.jsonl"
        proc = _cli(f"--checkpoint={path}", f"--prompts={prompts}", f"--output={out}", f"--seed={seed}",
                    f"--temperature={t}", f"--top_k={k}", f"--top_p={p}", "--max_length=8", "--batch_size=2",
                    "--inputs_length=16")
        assert proc.returncode == 0, proc.stderr[-3000:]
        texts[name] = [json.loads(l)["response"] for l in out.read_text().splitlines()]
        toks = _generate(config, params, PROMPTS, seed=seed, temperature=t, top_k=k, top_p=p)
        expected[name] = infer.detokenize(seqio.ByteVocabulary(), toks)
        assert toks.max() < BYTES
        # responses whose text is not their tokens are counted on stderr, one line
        garbled[name] = sum(not ok for ok in _round_trips(toks))
        lines = [l for l in proc.stderr.splitlines() if "are not their sampled tokens as text" in l]
        if garbled[name]:
            assert lines == [f"[infer] {garbled[name]} of {len(PROMPTS)} responses are not their sampled tokens as "
                             "text (decoding and encoding again gives other tokens, e.g. an incomplete UTF-8 "
                             "sequence is dropped); they are written as decoded"], proc.stderr[-3000:]
        else:
            assert not lines, proc.stderr[-3000:]
        assert texts[name] == expected[name], name
    assert any(garbled.values()), garbled  # the count was checked where there was something to count
    # each flag changes the samples, so equal texts mean the CLI honoured it
    greedy = _texts(config, params, seed=0, temperature=0.0)
    assert texts["seed4"] != _texts(config, params, seed=5, temperature=1.0)  # two seeds at temperature 1
    assert texts["filtered"] != _texts(config, params, seed=3, temperature=1.0)
    assert texts["filtered"] != _texts(config, params, seed=3, temperature=1.0, top_k=20)
    assert texts["filtered"] != _texts(config, params, seed=3, temperature=1.0, top_p=0.9)
    assert texts["seed4"] != greedy
    # a temperature far below float32's normal range is greedy, not overflowed garbage
    assert texts["tiny_temperature"] == greedy


def _texts(config, params, **kw):
    return infer.detokenize(seqio.ByteVocabulary(), _generate(config, params, PROMPTS, **kw))


# ---- bug 5: tiny temperatures -------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-39, 1e-45, 1e-30])
def test_a_tiny_temperature_samples_the_greedy_tokens(model, temperature):
    _, config, params = model
    enc, _ = infer.tokenize(seqio.ByteVocabulary(), PROMPTS, 16)
    module = network.T5(config)
    greedy = np.asarray(decoding.generate(module, params, enc, max_length=12, vocab_size=BYTES))
    for top_k, top_p in ((0, 1.0), (5, 0.9)):
        tiny = decoding.generate(module, params, enc, max_length=12, vocab_size=BYTES, rng=jax.random.PRNGKey(2),
                                 temperature=temperature, top_k=top_k, top_p=top_p)
        np.testing.assert_array_equal(np.asarray(tiny), greedy)


# ---- bug 2: --vocabulary against the checkpoint's own -------------------------------------------------
def test_vocabulary_flag_may_not_contradict_the_checkpoint(model, spm_models, tmp_path, capsys):
    path, config, params = model
    spm_a, spm_b = spm_models
    sp_ckpt = _save(tmp_path / "sp", config, params, spm_a)  # keeps a copy of spm_a as its spiece.model
    none_ckpt = _save(tmp_path / "none", config, params, None)
    (tmp_path / "p.txt").write_text("hello\n")

    def run(ckpt, *flags):
        out = tmp_path / "o.jsonl"
        code = infer.main([f"--checkpoint={ckpt}", f"--prompts={tmp_path}/p.txt", f"--output={out}", "--overwrite",
                           "--max_length=3", "--inputs_length=8", *flags])
        return code, _error_lines(capsys.readouterr().err)

    for ckpt, recorded, flag in ((path, "byte", spm_a), (sp_ckpt, os.path.join(sp_ckpt, "spiece.model"), "byte"),
                                 (sp_ckpt, os.path.join(sp_ckpt, "spiece.model"), spm_b)):
        code, err = run(ckpt, f"--vocabulary={flag}")
        assert code == 2 and err == [f"error: --vocabulary={flag} differs from the vocabulary "
                                     f"{os.path.abspath(ckpt)} records ({recorded}); drop --vocabulary to use "
                                     "the checkpoint's"], err
    assert not (tmp_path / "o.jsonl").exists()
    # the same vocabulary, named as the checkpoint names it, by another path, or through a link
    os.symlink(spm_a, tmp_path / "link.model")
    for ckpt, flag in ((path, "byte"), (sp_ckpt, spm_a), (sp_ckpt, os.path.join(sp_ckpt, "spiece.model")),
                       (sp_ckpt, str(tmp_path / "link.model")), (none_ckpt, "byte"), (none_ckpt, spm_b)):
        assert run(ckpt, f"--vocabulary={flag}") == (0, []), (ckpt, flag)
    code, err = run(none_ckpt)
    assert code == 2 and err == [f"error: {os.path.abspath(none_ckpt)}: checkpoint records no vocabulary; "
                                 "pass --vocabulary"]


# ---- bugs 3 and 4: reading prompts files ----------------------------------------------------------------
def test_a_plain_text_first_line_may_start_with_a_brace(model, tmp_path, capsys):
    text = tmp_path / "p.txt"
    text.write_text("\n  \n{a, b} is a set; name its size\n \t \n{\"prompt\": 1\nplain\n")
    expected = ["{a, b} is a set; name its size", '{"prompt": 1', "plain"]  # whitespace-only lines skipped
    assert [r["prompt"] for r in infer.read_prompts(str(text))] == expected
    out = tmp_path / "o.jsonl"
    assert infer.main([f"--checkpoint={model[0]}", f"--prompts={text}", f"--output={out}", "--max_length=3",
                       "--inputs_length=16"]) == 0, capsys.readouterr().err
    assert [json.loads(l)["prompt"] for l in out.read_text().splitlines()] == expected
    # a JSONL file whose first record is broken is still JSONL, and says where
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a",}\n{"prompt": "b"}\n')
    with pytest.raises(infer.InputError, match=r"broken.jsonl:1: record: invalid JSON"):
        infer.read_prompts(str(broken))


@pytest.mark.parametrize("blank", ["\u200b", "\ufeff\u200b", " \u200b\t", "\u2060\x07"])
def test_a_plain_text_line_of_invisible_characters_is_refused(tmp_path, capsys, blank):
    text = tmp_path / "p.txt"
    text.write_text(f"first\n\n{blank}\nlast\n")
    assert infer.main(["--checkpoint=/nowhere", f"--prompts={text}", f"--output={tmp_path}/o.jsonl"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {text}:3: prompt: empty (only whitespace or invisible characters)"]
    # as the same prompt in JSONL is
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "first"}\n\n' + json.dumps({"prompt": blank}) + "\n")
    with pytest.raises(logs.BadRecordError, match=re.escape(f"{jsonl}:3: prompt: empty (only whitespace or "
                                                            "invisible characters)")):
        infer.read_prompts(str(jsonl))


@pytest.mark.parametrize("line,field", [('{"prompt": "first", "prompt": "second"}', "prompt"),
                                        ('{"prompt": "hi", "id": 1, "id": 2}', "id"),
                                        ('{"prompt": "hi", "meta": {"tags": [{"k": 1, "k": 2}]}}', "meta.tags[0].k")])
def test_a_key_given_twice_in_a_prompts_record_is_refused(tmp_path, capsys, line, field):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + line + "\n")
    assert infer.main(["--checkpoint=/nowhere", f"--prompts={prompts}", f"--output={tmp_path}/o.jsonl"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {prompts}:2: {field}: given twice in one record (which one is meant?)"]
    # the feedback-log reader says the same of the same line
    log = tmp_path / "log.jsonl"
    log.write_text(line.replace('"prompt": "hi"', '"prompt": "hi", "response": "r", "label": true') + "\n")
    with pytest.raises(logs.BadRecordError, match=re.escape(f"{field}: given twice in one record")):
        logs.load_feedback_log(str(log))


# ---- bug 6: out of memory -------------------------------------------------------------------------
def test_out_of_memory_is_one_line_naming_the_flags(model, tmp_path):
    (tmp_path / "p.txt").write_text("hello\nworld\n")
    out = tmp_path / "o.jsonl"
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    # 8 GiB of address space: the KV cache of 64 x 10**7 tokens asks for far more and fails at
    # once, where without a limit it might be granted lazily and exhaust the machine's memory.
    cmd = " ".join([f"ulimit -v {8 << 20} && exec", *map(shlex.quote, [
        sys.executable, "-m", "dro_jax.infer", f"--checkpoint={model[0]}", f"--prompts={tmp_path}/p.txt",
        f"--output={out}", "--max_length=10000000", "--batch_size=64", "--inputs_length=16"])])
    proc = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "RESOURCE_EXHAUSTED" not in proc.stderr, proc.stderr[-3000:]
    assert _error_lines(proc.stderr) == [
        "error: out of memory sampling batches of --batch_size=64 prompts x --max_length=10000000 tokens "
        "(prompts of --inputs_length=16 tokens); lower --max_length or --batch_size (or --inputs_length)"]
    assert not out.exists()


# ---- bug 8: the demo reward function's docstring binding works --------------------------------------------
def test_the_demo_reward_fn_docstring_flags_work(model, tmp_path):
    from dro_jax.demo import env

    flags = re.findall(r"`(--gin\S*)`", env.reward_fn.__doc__)
    assert flags, env.reward_fn.__doc__
    (tmp_path / "p.txt").write_text("shout: bako\nask: dure\n")
    envvars = dict(os.environ)
    envvars["XLA_FLAGS"] = " ".join(f for f in envvars.get("XLA_FLAGS", "").split()
                                    if "force_host_platform_device_count" not in f)
    proc = subprocess.run([sys.executable, "-m", "dro_jax.evaluate", f"--checkpoint={model[0]}",
                           f"--prompts={tmp_path}/p.txt", "--max_length=4", "--inputs_length=16", *flags],
                          cwd=str(tmp_path), env=envvars, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    assert metrics["n_eval"] == 2 and "thumbs_up_rate" in metrics, metrics
