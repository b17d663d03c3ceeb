"""`python -m dro_jax.infer` and `python -m dro_jax.evaluate` through their CLIs on a tiny checkpoint."""
import json
import re
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from dro_jax import checkpoints, evaluate, models, network
from dro_jax.demo import env as env_lib
from tiny import assert_kept_work_names_the_weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_BYTE = dict(vocab_size=259, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                 num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16)
PROMPTS = ["shout: bako", "ask: dure", "say: zimo", "shout: lepa", "ask: tovi"]


def _cli(module, *args, timeout=240):
    env = dict(os.environ)
    # one CPU device is enough (and faster) for these tiny runs
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if "force_host_platform_device_count" not in f)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _unbox(tree):
    import flax.linen as nn

    return jax.tree_util.tree_map(np.asarray, nn.meta.unbox(tree))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random tiny DRO-V checkpoint (policy + zero-initialised value head), byte vocabulary."""
    config = network.T5Config(**TINY_BYTE)
    model = models.DROModel(config, tau=1.0)
    variables = model.get_initial_variables(jax.random.PRNGKey(0), {"encoder_input_tokens": (2, 16),
                                                                     "decoder_input_tokens": (2, 12)})
    params = _unbox(variables["params"])
    path = str(tmp_path_factory.mktemp("ckpt") / "model")
    checkpoints.save_model_checkpoint(path, config=config, params=params["policy"], value_params=params["value"],
                                      vocabulary_path=checkpoints.BYTE_VOCABULARY)
    return path


def _one_line_error(proc):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def test_infer_cli(ckpt, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    proc = _cli("dro_jax.infer", f"--checkpoint={ckpt}", f"--prompts={prompts}", f"--output={out}",
                "--temperature=1.0", "--top_k=20", "--max_length=8", "--batch_size=2", "--inputs_length=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))  # other fields are kept
    assert all(isinstance(r["response"], str) for r in rows)
    assert all(len(r["response"].encode("utf-8", "replace")) <= 8 * 4 for r in rows)
    assert "wrote 5 responses" in proc.stdout

    # plain-text prompts, greedy; a missing file is a one-line error with exit 2
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(PROMPTS[:3]) + "\n")
    out2 = tmp_path / "out2.jsonl"
    proc = _cli("dro_jax.infer", f"--checkpoint={ckpt}", f"--prompts={text}", f"--output={out2}",
                "--max_length=6", "--inputs_length=16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads(l)["prompt"] for l in out2.read_text().splitlines()] == PROMPTS[:3]
    err = _one_line_error(_cli("dro_jax.infer", f"--checkpoint={ckpt}", f"--prompts={tmp_path / 'nope.jsonl'}",
                               f"--output={tmp_path / 'out3.jsonl'}"))
    assert "nope.jsonl" in err


def test_evaluate_log_mode_cli(ckpt, tmp_path):
    """Implied reward = tau*(logp - ref) is +1 on thumbs-up and -1 on thumbs-down: AUC 1, DRO loss 0 (V = 0)."""
    from dro_jax.infer import Policy, tokenize

    policy = Policy.load(ckpt)
    responses = ["bako!", "dure.", "zimo.", "lepa!", "tovi?"]
    labels = [True, False, True, False, True]
    enc, _ = tokenize(policy.vocabulary, PROMPTS, 16)
    tgt, _ = tokenize(policy.vocabulary, responses, 12)
    logp = policy.logprobs(enc, tgt, target_mask=(tgt > 0).astype(np.int32))
    ref = [float(lp - (1.0 if up else -1.0)) for lp, up in zip(logp, labels)]
    assert all(r <= 0 for r in ref), ref  # a random byte model gives each sequence a tiny probability
    log = tmp_path / "heldout.jsonl"
    env_lib.write_jsonl(str(log), ({"prompt": p, "response": r, "label": l, "ref_logprob": x}
                                   for p, r, l, x in zip(PROMPTS, responses, labels, ref)))
    out = tmp_path / "metrics.json"
    proc = _cli("dro_jax.evaluate", f"--checkpoint={ckpt}", f"--log={log}", "--inputs_length=16",
                "--targets_length=12", f"--output={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(out.read_text())
    assert m["mode"] == "log" and m["n"] == 5 and m["value_source"] == "value_network"
    assert m["implied_reward_auc"] == pytest.approx(1.0)
    assert m["dro_loss"] == pytest.approx(0.0, abs=1e-6)
    assert m["implied_reward_mean_up"] == pytest.approx(1.0, abs=1e-4)

    # the same log scored against the checkpoint itself as reference: log-ratio 0, V = 0 -> loss E[r^2]/2
    plain = tmp_path / "plain.jsonl"
    env_lib.write_jsonl(str(plain), ({"prompt": p, "response": r, "label": l}
                                     for p, r, l in zip(PROMPTS, responses, labels)))
    err = _one_line_error(_cli("dro_jax.evaluate", f"--checkpoint={ckpt}", f"--log={plain}"))
    assert "ref_logprob" in err and "--reference" in err
    proc = _cli("dro_jax.evaluate", f"--checkpoint={ckpt}", f"--log={plain}", f"--reference={ckpt}",
                "--inputs_length=16", "--targets_length=12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert m["dro_loss"] == pytest.approx(0.5, abs=1e-6)
    assert m["implied_reward_auc"] == pytest.approx(0.5)
    assert m["reference_source"] == os.path.abspath(ckpt) and m["inputs_truncated"] == 0


def test_evaluate_log_mode_reference_choice_and_undefined_auc(ckpt, tmp_path, capsys):
    """An explicit --reference wins over the log's ref_logprob (and says so); a log without
    thumbs-down records gets no AUC, with a note and the counts."""
    log = tmp_path / "up_only.jsonl"
    env_lib.write_jsonl(str(log), ({"prompt": p, "response": "bako!", "label": True, "ref_logprob": -50.0}
                                   for p in PROMPTS))
    args = [f"--checkpoint={ckpt}", f"--log={log}", "--inputs_length=16", "--targets_length=4"]
    assert evaluate.main(args) == 0
    out = capsys.readouterr()
    m = json.loads(out.out[out.out.index("{"):])
    assert m["reference_source"] == "log ref_logprob" and m["implied_reward_auc"] is None
    assert "thumbs-down" in m["implied_reward_auc_note"] and (m["n_thumbs_up"], m["n_thumbs_down"]) == (5, 0)
    assert m["targets_truncated"] == 5 and "5 responses longer than --targets_length=4" in out.err
    assert evaluate.main(args + [f"--reference={ckpt}"]) == 0
    out = capsys.readouterr()
    m = json.loads(out.out[out.out.index("{"):])
    assert m["reference_source"] == os.path.abspath(ckpt) and m["logratio_mean"] == pytest.approx(0, abs=1e-6)
    assert "the log's ref_logprob fields are not used" in out.err


def test_reward_function_results_are_checked_on_one_line():
    def boom(prompt, response):
        raise RuntimeError("backend down\nretry later")

    for fn, expected in ((boom, "reward_fn on prompt 3 ('ask: dure'): RuntimeError: backend down retry later"),
                         (lambda p, r: "1.5", "returned str '1.5', not a number"),
                         (lambda p, r: None, "returned NoneType None, not a number"),
                         (lambda p, r: float("nan"), "returned nan, not a finite number")):
        with pytest.raises(evaluate.InputError) as e:
            evaluate._reward(fn, 2, "ask: dure", "x")  # pylint: disable=protected-access
        assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)
    for ok, expected in ((np.float32(0.5), 0.5), (jax.numpy.float32(0.25), 0.25), (np.array(2.0), 2.0), (True, 1.0)):
        assert evaluate._reward(lambda p, r, v=ok: v, 0, "p", "r") == expected  # pylint: disable=protected-access


def test_sampling_flags_and_prompts_are_checked_before_any_work(tmp_path, capsys):
    from dro_jax import infer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "  \\t "}\n')
    base = ["--checkpoint=/nowhere", f"--prompts={prompts}", f"--output={tmp_path}/out.jsonl"]
    for extra, expected in ((["--temperature=nan"], "--temperature must be a finite number >= 0, got nan"),
                            (["--temperature=inf"], "--temperature must be a finite number >= 0, got inf"),
                            (["--top_p=1.5"], "--top_p must be in (0, 1], got 1.5"),
                            (["--top_k=-1"], "--top_k must be >= 0"),
                            ([], f"{prompts}:2: prompt: empty (only whitespace or invisible characters)")):
        assert infer.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (extra, err)
    assert infer.main(["--checkpoint=/nowhere", f"--prompts={prompts}", f"--output={prompts}"]) == 2
    assert "is the --prompts file" in capsys.readouterr().err
    assert prompts.read_text().startswith('{"prompt": "hi"}')


def test_evaluate_reward_mode_cli(ckpt, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    samples = tmp_path / "samples.jsonl"
    proc = _cli("dro_jax.evaluate", f"--checkpoint={ckpt}", f"--prompts={prompts}", f"--reference={ckpt}",
                "--gin_file=gin_configs/demo/evaluate_reward.gin", "--max_length=8", "--inputs_length=16",
                f"--samples_output={samples}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert m["mode"] == "reward" and m["n_eval"] == 5
    lo, hi = m["thumbs_up_ci95"]
    assert 0.0 <= lo <= m["thumbs_up_rate"] <= hi <= 1.0
    assert m["kl_to_reference"] == pytest.approx(0.0, abs=1e-5)  # the policy is its own reference
    assert "kl_to_reference_note" not in m and (m["top_k"], m["top_p"]) == (0, 1.0)  # temperature 1: a KL estimate
    assert m["prompts_truncated"] == 0
    rows = [json.loads(l) for l in samples.read_text().splitlines()]
    # Byte vocabulary: a response whose text is its tokens was cut exactly when it has 8 bytes;
    # the others (not their tokens) may or may not have been.
    cut, other = m["responses_cut_at_max_length"], m["responses_not_their_tokens"]
    eight_bytes = sum(len(r["response"].encode("utf-8")) == 8 for r in rows)
    assert eight_bytes - other <= cut <= eight_bytes + other, (cut, other, eight_bytes)
    assert ("responses reached --max_length=8 tokens" in proc.stderr) == (cut > 0), proc.stderr
    assert ("responses are not their sampled tokens" in proc.stderr) == (other > 0), proc.stderr
    rewards = [env_lib.reward_fn(r["prompt"], r["response"]) for r in rows]
    assert [r["reward"] for r in rows] == rewards
    assert m["mean_reward"] == pytest.approx(np.mean(rewards))
    assert m["thumbs_up_rate"] == pytest.approx(np.mean([r > 0 for r in rewards]))

    # bad input: no reward function, both modes at once, a gin binding to nothing callable
    assert "gin" in _one_line_error(_cli("dro_jax.evaluate", f"--checkpoint={ckpt}", f"--prompts={prompts}"))
    assert "exactly one" in _one_line_error(_cli("dro_jax.evaluate", f"--checkpoint={ckpt}",
                                                 f"--prompts={prompts}", f"--log={prompts}"))


def test_reward_mode_without_reference_says_why_there_is_no_kl(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    out = tmp_path / "m.json"
    assert evaluate.main([f"--checkpoint={ckpt}", f"--prompts={prompts}", "--max_length=4", "--inputs_length=16",
                          "--gin_file=gin_configs/demo/evaluate_reward.gin", f"--output={out}"]) == 0
    m = json.loads(out.read_text())
    assert "kl_to_reference" not in m
    assert m["kl_to_reference_note"] == "not computed: pass --reference=CKPT to estimate KL(pi || pi_ref)"
    assert "[evaluate] no --reference given, so kl_to_reference is not reported" in capsys.readouterr().err


def test_metric_functions():
    assert evaluate.auc([0.1, 0.9, 0.5, 0.3], [False, True, True, False]) == 1.0
    assert evaluate.auc([1, 1, 1], [True, False, True]) == 0.5
    assert evaluate.auc([0.2, 0.1], [True, True]) is None
    assert evaluate.auc([3, 1, 2, 0], [True, False, False, True]) == 0.5
    lo, hi = env_lib.wilson_interval(40, 100)
    assert lo == pytest.approx(0.3094, abs=1e-3) and hi == pytest.approx(0.4980, abs=1e-3)
    assert env_lib.wilson_interval(0, 10)[0] == 0.0
    for n in range(1, 600):  # exactly 0 / 1 at the ends (rounding once left 5.6e-17)
        assert env_lib.wilson_interval(0, n)[0] == 0.0 and env_lib.wilson_interval(n, n)[1] == 1.0, n
    assert evaluate.dro_loss(np.array([1.0, -1.0]), np.zeros(2), np.array([-1.0, -3.0]), np.array([-2.0, -2.0]),
                             1.0) == pytest.approx(0.0)
    # by hand: residuals r - V - tau (logp - ref) = 2 - 0.5 - 0.5 * 1 = 1 and 0 + 1 - 0.5 * (-2) = 2,
    # weighted 1:3, halved: (1 + 3 * 4) / 4 / 2
    assert evaluate.dro_loss(np.array([2.0, 0.0]), np.array([0.5, -1.0]), np.array([-1.0, -4.0]),
                             np.array([-2.0, -2.0]), 0.5, weights=np.array([1.0, 3.0])) == pytest.approx(1.625)
    from dro_jax.infer import count_cut  # rows without EOS (id 1) were cut at max_length
    assert count_cut(np.array([[5, 1, 0], [5, 6, 7], [1, 0, 0], [4, 4, 4]]), 1) == 2


@pytest.mark.parametrize("module,args", [
    ("infer", ["--checkpoint={tmp}/no_ckpt", "--prompts={tmp}/p.txt", "--output={tmp}/a_file/out.jsonl"]),
    ("score", ["--checkpoint={tmp}/no_ckpt", "--input={tmp}/p.txt", "--output={tmp}/a_file/out.jsonl"]),
    ("evaluate", ["--checkpoint={tmp}/no_ckpt", "--log={tmp}/p.txt", "--output={tmp}/a_file/out.json"]),
])
def test_unwritable_output_fails_before_any_work(tmp_path, capsys, module, args):
    # The output is checked first: no checkpoint loading, scoring or sampling is wasted on it.
    import importlib

    (tmp_path / "a_file").write_text("")
    (tmp_path / "p.txt").write_text("hello\n")
    main = importlib.import_module(f"dro_jax.{module}").main
    assert main([a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --output={tmp_path}/a_file/out.json"), err
    assert "cannot write" in err[0]
    assert sorted(os.listdir(tmp_path)) == ["a_file", "p.txt"]  # nothing created on the way


def test_output_check_creates_no_folders(tmp_path):
    from dro_jax import io_utils

    io_utils.check_writable_file(str(tmp_path / "new" / "deeper" / "out.jsonl"), "--output")
    assert os.listdir(tmp_path) == []


def test_vocabulary_larger_than_the_embedding_is_refused(tmp_path, capsys):
    # Ids past the table would be clamped silently by the embedding gather.
    from dro_jax import infer

    config = network.T5Config(**dict(TINY_BYTE, vocab_size=200))
    params = _unbox(network.T5(config).init(jax.random.PRNGKey(0), np.ones((1, 4), np.int32),
                                            np.ones((1, 4), np.int32))["params"])
    path = str(tmp_path / "small_vocab")
    checkpoints.save_model_checkpoint(path, config=config, params=params, vocabulary_path="byte")
    (tmp_path / "p.txt").write_text("hello\n")
    code = infer.main([f"--checkpoint={path}", f"--prompts={tmp_path}/p.txt", f"--output={tmp_path}/o.jsonl"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: the vocabulary has 259 ids but the model's embedding holds 200 "
                   "(T5Config.vocab_size); use the model's own vocabulary"]
    assert not os.path.exists(tmp_path / "o.jsonl")


def test_infer_on_a_feedback_log_moves_the_logged_response(ckpt, tmp_path, capsys):
    # The old response's completion, feedback and ref_logprob must not sit next to the new response.
    from dro_jax import infer
    from dro_jax.data import logs

    log = [{"id": "a", "prompt": PROMPTS[0], "completion": "old", "label": True, "ref_logprob": -3.0},
           {"id": "b", "prompt": PROMPTS[1], "response": "older", "reward": 0.5, "logged": {"weight": 2.0}}]
    prompts, out = tmp_path / "log.jsonl", tmp_path / "out.jsonl"
    env_lib.write_jsonl(str(prompts), log)
    assert infer.main([f"--checkpoint={ckpt}", f"--prompts={prompts}", f"--output={out}",
                       "--max_length=4", "--inputs_length=16"]) == 0
    assert "completion, label, ref_logprob, response, reward are kept under 'logged'" in capsys.readouterr().err
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [sorted(r) for r in rows] == [["id", "logged", "prompt", "response"]] * 2
    assert rows[0]["logged"] == {"completion": "old", "label": True, "ref_logprob": -3.0}
    assert rows[1]["logged"] == {"response": "older", "reward": 0.5, "logged": {"weight": 2.0}}
    # Labelled, the output is a valid feedback log of the new responses.
    env_lib.write_jsonl(str(out), ({**r, "label": False} for r in rows))
    assert [r.response for r in logs.read_feedback_log(str(out))] == [r["response"] for r in rows]


def test_evaluate_refuses_ref_logprobs_scored_at_lengths_that_cut_differently(ckpt, tmp_path, capsys):
    log = tmp_path / "scored.jsonl"
    env_lib.write_jsonl(str(log), ({"prompt": p, "response": "bako!", "label": i % 2 == 0, "ref_logprob": -5.0,
                                    "ref_logprob_lengths": {"inputs": 16, "targets": 4}}
                                   for i, p in enumerate(PROMPTS)))
    args = [f"--checkpoint={ckpt}", f"--log={log}", "--inputs_length=16"]
    assert evaluate.main(args + ["--targets_length=4"]) == 0  # the lengths it was scored at
    capsys.readouterr()
    assert evaluate.main(args + ["--targets_length=8"]) == 2  # "bako!" + EOS: 6 tokens, cut at 4 before
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {log}:1: ref_logprob: scored at inputs=16, targets=4"), err


def test_outputs_never_touch_a_file_named_output_tmp(ckpt, tmp_path, capsys):
    # `<output>.tmp` may be the user's file, even the input itself: a unique temporary name is used.
    from dro_jax import infer

    prompts = tmp_path / "out.jsonl.tmp"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:2]))
    before = prompts.read_text()
    out = tmp_path / "out.jsonl"
    assert infer.main([f"--checkpoint={ckpt}", f"--prompts={prompts}", f"--output={out}", "--max_length=4",
                       "--inputs_length=16"]) == 0
    assert prompts.read_text() == before and len(out.read_text().splitlines()) == 2
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.tmp"]  # no temporary file left

    samples, metrics = tmp_path / "samples.jsonl", tmp_path / "metrics.json"
    for name in ("samples.jsonl.tmp", "metrics.json.tmp"):
        (tmp_path / name).write_text("mine\n")
    assert evaluate.main([f"--checkpoint={ckpt}", f"--prompts={prompts}", "--max_length=4", "--inputs_length=16",
                          "--gin_file=gin_configs/demo/evaluate_reward.gin", f"--samples_output={samples}",
                          f"--output={metrics}"]) == 0
    capsys.readouterr()
    assert prompts.read_text() == before
    assert (tmp_path / "samples.jsonl.tmp").read_text() == (tmp_path / "metrics.json.tmp").read_text() == "mine\n"
    assert len(samples.read_text().splitlines()) == 2 and json.loads(metrics.read_text())["n_eval"] == 2
    assert sorted(os.listdir(tmp_path)) == ["metrics.json", "metrics.json.tmp", "out.jsonl", "out.jsonl.tmp",
                                            "samples.jsonl", "samples.jsonl.tmp"]


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    from dro_jax import io_utils

    def lines():
        yield "one\n"
        raise RuntimeError("stopped half-way")

    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    with pytest.raises(RuntimeError):
        io_utils.write_text_atomically(str(out), lines())
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate cannot be written as UTF-8
        env_lib.write_jsonl(str(out), [{"prompt": "ok"}, {"prompt": "\ud800"}])
    assert os.listdir(tmp_path) == ["out.jsonl"] and out.read_text() == "old\n"
    io_utils.write_text_atomically(str(tmp_path / "new" / "out.jsonl.gz"), ["a\n"], compress=True)
    assert (tmp_path / "new" / "out.jsonl.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert os.listdir(tmp_path / "new") == ["out.jsonl.gz"]


def test_evaluate_refuses_an_output_that_is_an_input(tmp_path, capsys):
    log, prompts = tmp_path / "log.jsonl", tmp_path / "prompts.txt"
    log.write_text('{"prompt": "p", "response": "r", "label": true, "ref_logprob": -1.0}\n')
    prompts.write_text("hello\n")
    os.link(prompts, tmp_path / "hard_link.txt")
    cases = [([f"--log={log}", f"--output={log}"], f"--output={log} is the --log file"),
             ([f"--prompts={prompts}", f"--samples_output={tmp_path / 'hard_link.txt'}"],
              f"--samples_output={tmp_path / 'hard_link.txt'} is the --prompts file"),
             ([f"--prompts={prompts}", f"--output={prompts}"], f"--output={prompts} is the --prompts file"),
             ([f"--prompts={prompts}", f"--output={tmp_path}/o.json", f"--samples_output={tmp_path}/o.json"],
              "--samples_output and --output are the same file")]
    for extra, expected in cases:
        # --overwrite does not allow it either; the missing checkpoint shows the check comes first
        assert evaluate.main(["--checkpoint=/nowhere", "--overwrite", *extra,
                              "--gin_file=gin_configs/demo/evaluate_reward.gin"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {expected}"), (extra, err)
    assert log.read_text().startswith('{"prompt": "p"') and prompts.read_text() == "hello\n"


@pytest.mark.parametrize("module", ["infer", "evaluate"])
def test_existing_outputs_need_overwrite(tmp_path, capsys, module):
    import importlib

    main = importlib.import_module(f"dro_jax.{module}").main
    (tmp_path / "p.txt").write_text("hello\n")
    base = ["--checkpoint=/nowhere", f"--prompts={tmp_path}/p.txt"]
    if module == "evaluate":
        base.append("--gin_file=gin_configs/demo/evaluate_reward.gin")
    flags = ["--output"] + (["--samples_output"] if module == "evaluate" else [])
    for flag in flags:
        out = tmp_path / f"{flag[2:]}.json"
        out.write_text("keep\n")
        assert main(base + [f"{flag}={out}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {flag}={out} exists; pass --overwrite to replace it"], err
        assert main(base + [f"{flag}={out}", "--overwrite"]) == 2  # past the check: the missing checkpoint
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "/nowhere" in err[0], err
        assert out.read_text() == "keep\n"


def test_prompts_split_on_newline_only(tmp_path):
    from dro_jax import infer

    jsonl = tmp_path / "p.jsonl"
    # raw U+2028, U+2029 and NEL are valid inside JSON strings (a raw form feed is not)
    jsonl.write_bytes('{"prompt": "a\u2028b"}\r\n{"prompt": "c\x85d", "id": "x\u2029y"}\n'.encode("utf-8"))
    assert infer.read_prompts(str(jsonl)) == [{"prompt": "a\u2028b"}, {"prompt": "c\x85d", "id": "x\u2029y"}]
    text = tmp_path / "p.txt"
    text.write_bytes("one\x0ctwo\r\nthree\u2029four\rfive\n\nsix".encode("utf-8"))
    assert [r["prompt"] for r in infer.read_prompts(str(text))] == ["one\x0ctwo", "three\u2029four\rfive", "six"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b'{"prompt": "ok"}\n\x0c\n{"prompt": 3}\n')  # line numbers count "\n" only
    with pytest.raises(ValueError, match=r"bad.txt:3: prompt: expected a string, got an integer$"):
        infer.read_prompts(str(bad))


def _prompts_errors(tmp_path, capsys, line):
    """stderr lines of infer and of reward-mode evaluate on a prompts file whose line 2 is `line`
    (each exits 2 and writes nothing); returns (prompts path, [infer's, evaluate's])."""
    from dro_jax import infer

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine"}\n' + line + "\n")
    errors = []
    for main, extra in ((infer.main, [f"--output={tmp_path}/out.jsonl"]),
                        (evaluate.main, ["--gin_file=gin_configs/demo/evaluate_reward.gin",
                                         f"--samples_output={tmp_path}/out.jsonl"])):
        assert main(["--checkpoint=/nowhere", f"--prompts={prompts}", *extra]) == 2
        errors.append(capsys.readouterr().err.strip().splitlines())
    assert sorted(os.listdir(tmp_path)) == ["p.jsonl"]
    return prompts, errors


@pytest.mark.parametrize("line,field", [('{"prompt": "a\\ud800b"}', "prompt"), ('{"prompt": "hi", "id": "\\udc00"}', "id"),
                                        ('{"prompt": "hi", "meta": {"tags": ["\\ud800"]}}', "meta.tags[0]")])
def test_lone_surrogates_in_prompts_are_refused_at_read_time(tmp_path, capsys, line, field):
    prompts, errors = _prompts_errors(tmp_path, capsys, line)
    for err in errors:
        assert len(err) == 1 and err[0].startswith(f"error: {prompts}:2: {field}: invalid Unicode (lone surrogate U+"), err


@pytest.mark.parametrize("line,expected", [
    ('{"text": "hi"}', "prompt: missing"),
    ('{"prompt": null}', "prompt: expected a string, got null"),
    ('{"prompt": [{"role": "user", "content": "hi"}]}',
     "prompt: expected a string, got a list (a prompts file holds plain-string prompts; message lists are read "
     "only in feedback logs)"),
    ('[1]', "record: expected a JSON object with a 'prompt'"),
])
def test_a_bad_prompts_record_says_what_is_wrong(tmp_path, capsys, line, expected):
    """`FILE:LINE: field: reason`, as the log reader says it, from infer and reward-mode evaluate."""
    prompts, errors = _prompts_errors(tmp_path, capsys, line)
    for err in errors:
        assert err == [f"error: {prompts}:2: {expected}"], err


def test_malformed_model_json_is_one_line(tmp_path, capsys):
    from dro_jax import infer

    (tmp_path / "p.txt").write_text("hello\n")
    for name, meta in (("no_network", {"format": "dro_jax", "vocabulary": "byte"}),
                       ("a_list", [1, 2]),
                       ("bad_network", {"network": {"d_model": "x", "no_such_field": 1}, "vocabulary": "byte"}),
                       ("bad_vocab", {"network": network.T5Config(**TINY_BYTE).to_dict(), "vocabulary": 3})):
        for layout in ("ckpt", "run"):
            path = tmp_path / f"{name}_{layout}"
            (path / ("params" if layout == "ckpt" else "checkpoints/1/state")).mkdir(parents=True)
            (path / checkpoints.MODEL_JSON).write_text(json.dumps(meta))
            with pytest.raises(checkpoints.CheckpointError, match="^" + re.escape(f"{path}/{checkpoints.MODEL_JSON}: ")):
                checkpoints.load_model_checkpoint(str(path))
            assert infer.main([f"--checkpoint={path}", f"--prompts={tmp_path}/p.txt",
                               f"--output={tmp_path}/o.jsonl"]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith(f"error: {path}/{checkpoints.MODEL_JSON}: "), err


def test_evaluate_log_mode_shows_scoring_progress(ckpt, tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    env_lib.write_jsonl(str(log), ({"prompt": p, "response": "bako!", "label": i % 2 == 0}
                                   for i, p in enumerate(PROMPTS)))
    assert evaluate.main([f"--checkpoint={ckpt}", f"--log={log}", f"--reference={ckpt}", "--inputs_length=16",
                          "--targets_length=8", "--batch_size=2"]) == 0
    err = capsys.readouterr().err
    assert "policy log-probs: 100%" in err and "reference log-probs: 100%" in err, err
    assert "5/5" in err


@pytest.mark.parametrize("mode,extra,expected", [
    ("log", ["--temperature=0.5", "--samples_output=s.jsonl"],
     "--temperature, --samples_output only apply to reward mode (--prompts), not to this log-mode run; drop them"),
    ("log", ["--gin_file=gin_configs/demo/evaluate_reward.gin"],
     "--gin_file/--gin.* only applies to reward mode (--prompts)"),
    ("reward", ["--gin_file=gin_configs/demo/evaluate_reward.gin", "--tau=0.5"],
     "--tau only applies to log mode (--log), not to this reward-mode run; drop it"),
    # given at their default values: still refused, since the run would not read them
    ("log", ["--temperature=1"], "--temperature only applies to reward mode (--prompts)"),
    ("log", ["--top_k=0", "--top_p=1", "--max_length=64", "--seed=0"],
     "--top_k, --top_p, --max_length, --seed only apply to reward mode (--prompts)"),
    ("log", ["--gin_bindings=evaluate.reward_settings.thumbs_up_threshold = 0.0"],
     "--gin_file/--gin.* only applies to reward mode (--prompts)"),
    ("reward", ["--gin_file=gin_configs/demo/evaluate_reward.gin", "--tau=1.0", "--targets_length=256"],
     "--tau, --targets_length only apply to log mode (--log), not to this reward-mode run; drop them"),
])
def test_evaluate_refuses_flags_the_mode_would_ignore(tmp_path, capsys, mode, extra, expected):
    src = tmp_path / "in.txt"
    src.write_text('{"prompt": "p", "response": "r", "label": true, "ref_logprob": -1.0}\n')
    extra = [e.replace("s.jsonl", str(tmp_path / "s.jsonl")) for e in extra]
    assert evaluate.main(["--checkpoint=/nowhere", f"--{'log' if mode == 'log' else 'prompts'}={src}", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {expected}"] or (len(err) == 1 and err[0].startswith(f"error: {expected}")), err
    assert sorted(os.listdir(tmp_path)) == ["in.txt"]


def test_a_reference_with_another_vocabulary_is_refused():
    import seqio

    evaluate.check_same_vocabulary(seqio.ByteVocabulary(), seqio.ByteVocabulary(), "ref")
    with pytest.raises(evaluate.InputError, match=r"--reference=ref has another vocabulary than --checkpoint"):
        evaluate.check_same_vocabulary(seqio.ByteVocabulary(), seqio.ByteVocabulary(extra_ids=10), "ref")


@pytest.mark.parametrize("value_kind", ["separate", "shared", "scalar"])
def test_policy_values_for_every_value_kind(value_kind):
    """evaluate's DRO loss uses the checkpoint's value network of any kind, not the best constant."""
    import jax
    import seqio
    from flax import linen as nn

    from dro_jax import models
    from dro_jax.infer import Policy
    from tiny import random_batch, tiny_config

    model = models.DROModel(tiny_config(), value_kind=value_kind)
    batch = random_batch(batch=3)
    params = nn.meta.unbox(model.get_initial_variables(jax.random.PRNGKey(0), {
        k: v.shape for k, v in batch.items() if k in ("encoder_input_tokens", "decoder_input_tokens")})["params"])
    params["value"] = jax.tree_util.tree_map(lambda x: x + 0.25, params["value"])  # not the zero init
    policy = Policy(model.config, params["policy"], seqio.ByteVocabulary(), value_params=params["value"])
    got = policy.values(np.asarray(batch["encoder_input_tokens"]), batch_size=2)
    np.testing.assert_allclose(got, np.asarray(model.values(params, batch)), rtol=1e-5, atol=1e-6)
    if value_kind == "scalar":
        np.testing.assert_allclose(got, np.full(3, float(params["value"]["value"])), rtol=1e-6)
    assert np.ptp(got) > 0 or value_kind == "scalar"


def test_evaluate_computes_the_runs_own_objective(tmp_path, capsys):
    """A run trained with tau 0.5, thumbs down = 0 and standardised rewards: evaluate's held-out
    DRO loss uses that tau, that mapping and the run's statistics, its trained (non-zero) value
    network and the log's weights; checked against numpy on the policy's own log-probs and values."""
    import seqio

    from dro_jax import optim, sharding, trainer
    from dro_jax.data import rewards as data_rewards
    from dro_jax.data import tasks as data_tasks
    from dro_jax.infer import Policy, tokenize

    labels = [True, False, True, False, True, True]
    train_log = tmp_path / "train.jsonl"
    env_lib.write_jsonl(str(train_log), ({"prompt": p, "response": p.split()[-1] + "!", "label": l}
                                         for p, l in zip(PROMPTS * 2, labels * 2)))
    data_tasks.register_feedback_task(
        "evaluate_objective_test", paths=str(train_log), vocabulary=seqio.ByteVocabulary(), overwrite=True,
        reward_mapping=data_rewards.RewardMapping(thumbs_up=1.0, thumbs_down=0.0, standardize=True))
    run = str(tmp_path / "run")
    trainer.train(model_dir=run, model=models.DROModel(network.T5Config(**TINY_BYTE), tau=0.5),
                  task_name="evaluate_objective_test", task_feature_lengths={"inputs": 16, "targets": 12},
                  batch_size=4, train_steps=3, mesh_config=sharding.MeshConfig(data=1, model=1), dropout=False,
                  policy_optimizer=optim.OptimizerConfig(name="sgd", learning_rate=0.1, warmup_steps=0),
                  value_optimizer=optim.OptimizerConfig(name="sgd", learning_rate=0.5, warmup_steps=0))
    capsys.readouterr()

    responses = ["bako!", "dure.", "zimo.", "lepa!", "tovi?", "bako?"]
    weights = [1.0, 0.0, 2.0, 1.0, 0.5, 1.0]
    held = tmp_path / "held.jsonl"
    env_lib.write_jsonl(str(held), ({"prompt": p, "response": r, "label": l, "weight": w}
                                    for p, r, l, w in zip(PROMPTS + PROMPTS[:1], responses, labels, weights)))
    args = [f"--checkpoint={run}", f"--log={held}", f"--reference={ckpt_path(tmp_path)}", "--inputs_length=16",
            "--targets_length=12"]
    assert evaluate.main(args) == 0
    m = json.loads(capsys.readouterr().out)
    assert (m["tau"], m["tau_source"], m["reward_mapping"]) == (0.5, "run", {"thumbs_up": 1.0, "thumbs_down": 0.0})

    policy, reference = Policy.load(run), Policy.load(ckpt_path(tmp_path))
    enc, _ = tokenize(policy.vocabulary, PROMPTS + PROMPTS[:1], 16)
    tgt, _ = tokenize(policy.vocabulary, responses, 12)
    mask = (tgt > 0).astype(np.int32)
    logratio = (policy.logprobs(enc, tgt, target_mask=mask).astype(np.float64)
                - reference.logprobs(enc, tgt, target_mask=mask))
    values = policy.values(enc).astype(np.float64)
    assert np.ptp(values) > 0  # a trained value network, not the zero init
    stats = data_rewards.RewardStats.load(os.path.join(run, "reward_stats.json"))
    trained_on = np.array([1.0 if l else 0.0 for _, l in zip(PROMPTS * 2, labels * 2)])  # thumbs down = 0
    np.testing.assert_allclose([stats.mean, stats.std], [trained_on.mean(), trained_on.std()], rtol=1e-6)
    raw = np.array([1.0 if l else 0.0 for l in labels])
    r = (raw - stats.mean) / stats.std
    expected = 0.5 * np.average((r - values - 0.5 * logratio) ** 2, weights=weights)
    assert m["dro_loss"] == pytest.approx(expected, rel=1e-4) and m["dro_loss_weighted"] is True

    # --tau overrides, and says it differs from the run's
    assert evaluate.main(args + ["--tau=2"]) == 0
    out = capsys.readouterr()
    m2 = json.loads(out.out)
    assert m2["tau_source"] == "--tau" and "differs from the run's tau 0.5" in out.err
    assert m2["dro_loss"] == pytest.approx(0.5 * np.average((r - values - 2 * logratio) ** 2, weights=weights),
                                           rel=1e-4)


def ckpt_path(tmp_path):
    """A random tiny checkpoint without a value network (built once per test folder)."""
    path = tmp_path / "no_value"
    if not path.exists():
        config = network.T5Config(**TINY_BYTE)
        variables = models.BaseModel(config).module.init(
            jax.random.PRNGKey(5), np.zeros((1, 16), np.int32), np.zeros((1, 12), np.int32))
        checkpoints.save_model_checkpoint(str(path), config=config, params=_unbox(variables["params"]),
                                          vocabulary_path=checkpoints.BYTE_VOCABULARY)
    return str(path)


def test_without_a_value_network_the_loss_uses_the_weighted_best_constant(tmp_path, capsys):
    from dro_jax.infer import Policy, tokenize

    path = ckpt_path(tmp_path)
    responses = ["bako!", "dure.", "zimo.", "lepa!", "tovi?"]
    labels = [True, False, True, False, True]
    weights = [1.0, 3.0, 0.0, 1.0, 1.0]
    policy = Policy.load(path)
    enc, _ = tokenize(policy.vocabulary, PROMPTS, 16)
    tgt, _ = tokenize(policy.vocabulary, responses, 12)
    logp = policy.logprobs(enc, tgt, target_mask=(tgt > 0).astype(np.int32)).astype(np.float64)
    ref = logp - np.array([0.3, -0.2, 0.1, 0.4, -0.5])
    log = tmp_path / "held.jsonl"
    env_lib.write_jsonl(str(log), ({"prompt": p, "response": r, "label": l, "weight": w, "ref_logprob": x}
                                   for p, r, l, w, x in zip(PROMPTS, responses, labels, weights, ref)))
    assert evaluate.main([f"--checkpoint={path}", f"--log={log}", "--inputs_length=16", "--targets_length=12"]) == 0
    m = json.loads(capsys.readouterr().out)
    resid = np.array([1.0 if l else -1.0 for l in labels]) - 1.0 * (logp - ref)  # tau 1: no run records one
    v = np.average(resid, weights=weights)
    assert m["value_source"] == "best_constant" and m["tau_source"].startswith("default")
    assert m["value_mean"] == pytest.approx(v, rel=1e-4)
    assert m["dro_loss"] == pytest.approx(0.5 * np.average((resid - v) ** 2, weights=weights), rel=1e-4)


def test_reward_mode_kl_against_another_reference(ckpt, tmp_path, capsys):
    """KL(pi || pi_ref) against a different random reference: the mean over the samples of
    log pi - log pi_ref, each scored here straight from the network's logits (EOS included)."""
    import jax.numpy as jnp

    from dro_jax.infer import Policy, response_mask

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    reference = ckpt_path(tmp_path)
    assert evaluate.main([f"--checkpoint={ckpt}", f"--prompts={prompts}", f"--reference={reference}",
                          "--gin_file=gin_configs/demo/evaluate_reward.gin", "--max_length=8",
                          "--inputs_length=16", "--batch_size=4", "--seed=3"]) == 0
    m = json.loads(capsys.readouterr().out)

    policy, ref = Policy.load(ckpt), Policy.load(reference)
    enc, gen = policy.sample_tokens(PROMPTS, inputs_length=16, max_length=8, temperature=1.0, batch_size=4, seed=3)
    mask = response_mask(gen, policy.config.eos_id)

    def summed(p):
        dec_in = np.concatenate([np.zeros((len(gen), 1), np.int32), gen[:, :-1]], axis=1)
        logits = network.T5(p.config).apply({"params": p.params}, jnp.asarray(enc), jnp.asarray(dec_in))
        logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
        return (np.take_along_axis(logp, gen[..., None], -1)[..., 0] * mask).sum(-1)

    diff = summed(policy) - summed(ref)
    assert abs(diff.mean()) > 0.1  # another model: a KL clearly away from 0
    assert m["kl_to_reference"] == pytest.approx(diff.mean(), rel=1e-4, abs=1e-4)
    assert m["kl_to_reference_stderr"] == pytest.approx(diff.std(ddof=1) / np.sqrt(len(diff)), rel=1e-3)


@pytest.mark.parametrize("field,value,misfit", [
    ("num_heads", 8, r"parameter decoder/\S+: the checkpoint has \([\d, ]+\), but its dro_jax_model.json "
                     r"implies \([\d, ]+\) \(were the checkpoint and its run's metadata mixed up\?\)$"),
    ("scan_layers", True, r"parameter decoder/layers/\S+: the checkpoint lacks it, but its dro_jax_model.json implies"),
])
def test_params_that_do_not_fit_their_model_json_are_one_line(ckpt, tmp_path, capsys, field, value, misfit):
    """A step folder under another run's dro_jax_model.json, or an edited one: flax's traceback
    (exit 1, which infer documents as running out of memory) became one line, exit 2."""
    from dro_jax import infer

    path = tmp_path / "ckpt"
    shutil.copytree(ckpt, path)
    meta = json.loads((path / checkpoints.MODEL_JSON).read_text())
    assert meta["network"][field] != value
    meta["network"][field] = value
    (path / checkpoints.MODEL_JSON).write_text(json.dumps(meta))
    with pytest.raises(checkpoints.CheckpointError, match="^" + re.escape(str(path)) + ": " + misfit):
        checkpoints.load_model_checkpoint(str(path))
    (tmp_path / "p.txt").write_text("hello\n")
    assert infer.main([f"--checkpoint={path}", f"--prompts={tmp_path}/p.txt", f"--output={tmp_path}/o.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: parameter "), err


def test_an_interrupted_infer_keeps_its_responses_and_the_same_command_finishes_them(ckpt, tmp_path, capsys,
                                                                                     monkeypatch):
    """Ctrl-C and SIGTERM keep the finished batches; rerun, the output equals one uninterrupted
    run's (sampling at temperature 1, so every batch's key matters)."""
    import signal

    from dro_jax import decoding, infer, io_utils

    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(10)))
    common = [f"--checkpoint={ckpt}", f"--prompts={tmp_path}/p.txt", "--batch_size=2", "--temperature=1",
              "--max_length=6", "--inputs_length=12"]
    run = lambda out, *extra: infer.main(common + [f"--output={tmp_path}/{out}", *extra])
    assert run("whole.jsonl", "--seed=3") == 0
    whole = (tmp_path / "whole.jsonl").read_text()
    capsys.readouterr()

    real, calls = decoding.generate, []

    def interrupted_at(n, how):
        def generate(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                if how == "SIGTERM":
                    os.kill(os.getpid(), signal.SIGTERM)  # the handler raises before this batch is kept
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return generate

    out, partial = tmp_path / "out.jsonl", tmp_path / ("out.jsonl" + io_utils.PartialOutput.SUFFIX)
    monkeypatch.setattr(decoding, "generate", interrupted_at(3, "Ctrl-C"))
    assert run("out.jsonl", "--seed=3") == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"[infer] stopped by Ctrl-C after 4 of 10 prompts; what it finished is kept in {partial}, and the same "
        "command continues from there")
    assert partial.exists() and not out.exists()
    settings = assert_kept_work_names_the_weights(partial, ckpt)
    # Other settings would mix two runs' samples: refused, and the kept responses stay.
    assert run("out.jsonl", "--seed=4") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {partial} holds an interrupted run of other settings (seed: 3, now 4); rerun that command to "
        "finish it, or pass --overwrite to start over")
    calls.clear()
    monkeypatch.setattr(decoding, "generate", interrupted_at(2, "SIGTERM"))
    assert run("out.jsonl", "--seed=3") == 143
    err = capsys.readouterr().err
    assert "continuing an interrupted run: 4 of 10 prompts were done" in err
    assert "[infer] stopped by SIGTERM after 6 of 10 prompts" in err
    monkeypatch.setattr(decoding, "generate", real)
    # Stopped while writing, after the last batch: every response is kept, and the rerun samples none.
    from dro_jax.demo import env

    def write_interrupted(path, records):
        raise KeyboardInterrupt
    monkeypatch.setattr(env, "write_jsonl", write_interrupted)
    assert run("out.jsonl", "--seed=3") == 130
    assert "[infer] stopped by Ctrl-C after 10 of 10 prompts" in capsys.readouterr().err
    monkeypatch.undo()
    calls.clear()
    monkeypatch.setattr(decoding, "generate", interrupted_at(1, "Ctrl-C"))  # would stop any sampling
    assert run("out.jsonl", "--seed=3") == 0
    assert "continuing an interrupted run: 10 of 10 prompts were done" in capsys.readouterr().err
    assert out.read_text() == whole and not partial.exists() and not calls
    # What cannot be read is refused, or dropped with --overwrite; so is what an earlier version kept.
    monkeypatch.setattr(decoding, "generate", real)
    out.unlink()
    earlier = {k: v for k, v in settings.items() if k != "params"}
    with open(partial, "wb") as f:
        np.savez(f, settings=json.dumps(earlier), done=2, rows=np.zeros((2, 6), np.int32))
    assert run("out.jsonl", "--seed=3") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {partial} was written by an earlier dro_jax, which did not record params; pass --overwrite to "
        "start over")
    partial.write_bytes(b"not an npz")
    assert run("out.jsonl", "--seed=3") == 2
    assert "cannot read what an interrupted run kept" in capsys.readouterr().err
    assert run("out.jsonl", "--seed=3", "--overwrite") == 0 and out.read_text() == whole and not partial.exists()


def test_an_interrupted_evaluate_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    """Ctrl-C or SIGTERM mid-evaluation (a real one, stopped while it scores the policy): one
    line and 130/143, not a traceback, and no --output file."""
    import signal
    import time

    from dro_jax.infer import Policy

    log = tmp_path / "heldout.jsonl"
    env_lib.write_jsonl(str(log), ({"prompt": p, "response": "bako!", "label": i % 2 == 0, "ref_logprob": -30.0}
                                   for i, p in enumerate(PROMPTS)))

    def stopped_by(sig):
        def logprobs(self, *args, **kwargs):
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises before this ends
            raise AssertionError("the signal did not stop the evaluation")
        return logprobs

    for sig, code, name in ((signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")):
        monkeypatch.setattr(Policy, "logprobs", stopped_by(sig))
        out = tmp_path / f"metrics_{name}.json"
        assert evaluate.main([f"--checkpoint={ckpt}", f"--log={log}", "--inputs_length=16", "--targets_length=12",
                              f"--output={out}"]) == code
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1] == f"[evaluate] stopped by {name}; nothing was written", err
        assert "Traceback" not in err and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


def test_scalar_rewards_count_as_up_above_zero_as_the_run_standardises_them(ckpt, tmp_path, capsys):
    """Raw 1-10 scores are all above 0: every record was "up" and the AUC undefined. Standardised
    with the run's statistics (here given by --reward_stats, as for one task of a mixture run), the
    records above the mean are up."""
    from dro_jax.data.rewards import RewardStats

    log = tmp_path / "scores.jsonl"
    scores = [2.0, 9.0, 3.0, 8.0, 7.0]
    env_lib.write_jsonl(str(log), ({"prompt": p, "response": "bako!", "reward": r, "ref_logprob": -50.0}
                                   for p, r in zip(PROMPTS, scores)))
    args = [f"--checkpoint={ckpt}", f"--log={log}", "--inputs_length=16", "--targets_length=8"]
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    m = json.loads(out[out.index("{"):])
    assert (m["n_thumbs_up"], m["n_thumbs_down"]) == (5, 0) and m["implied_reward_auc"] is None
    assert "after the run's standardisation" in m["implied_reward_auc_note"]
    stats = tmp_path / "reward_stats.task.json"
    RewardStats(mean=5.5, std=2.0, count=5).save(str(stats))
    assert evaluate.main(args + [f"--reward_stats={stats}"]) == 0
    out = capsys.readouterr().out
    m = json.loads(out[out.index("{"):])
    assert (m["n_thumbs_up"], m["n_thumbs_down"]) == (3, 2) and m["implied_reward_auc"] is not None
    assert m["reward_standardization"] == str(stats)
    assert evaluate.main(args + [f"--reward_stats={tmp_path}/none.json"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --reward_stats={tmp_path}/none.json: no such file"
