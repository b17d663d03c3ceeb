"""dro_jax.bench: runs on a tiny config, reports every field, FLOPs formula vs XLA/jaxpr,
and imports nothing a bare accelerator host lacks. No timing assertions."""
import json
import os
import subprocess
import sys

import pytest

from dro_jax import bench, flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = ("tensorflow", "seqio", "gin", "clu", "tensorflow_datasets")
# Blocks the forbidden packages outright, as on a host that has only jax/flax/optax/orbax.
BLOCK = (
    "import sys, importlib.abc\n"
    "class _Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    f"        if name.split('.')[0] in {FORBIDDEN!r}:\n"
    "            raise ImportError('blocked on a bare host: ' + name)\n"
    "sys.meta_path.insert(0, _Block())\n"
)
TINY_ARGS = ["--sizes", "tiny", "--algos", "dro_v", "--batch", "4", "--inputs_len", "32",
             "--targets_len", "16", "--steps", "2", "--warmup", "1"]
# Matmul FLOPs dominate even the tiny size; XLA's count adds elementwise ops (norms, softmax,
# log-softmax, Adafactor): measured 1.05 (dro_v, 64/32 tokens) to 1.13 (kto, whose repeated
# encoder passes XLA only partly merges).
XLA_OVER_MODEL = (1.0, 1.25)


ONE_DEVICE = "--xla_force_host_platform_device_count=1"


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env["XLA_FLAGS"] = ONE_DEVICE  # as on a plain host; records carry it
    return env


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=900)


def test_import_pulls_in_no_tf_seqio_gin_clu():
    proc = _python(BLOCK + "import dro_jax.bench, dro_jax.flops\n"
                   f"print([m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}])")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture(scope="module")
def tiny_record(tmp_path_factory):
    """One full run (build, trace, compile, time, profile) with TF/seqio/gin/clu blocked."""
    args = TINY_ARGS + ["--profile_dir", str(tmp_path_factory.mktemp("profile"))]
    code = BLOCK + (
        "from dro_jax import bench\n"
        f"bench.main({args!r})\n"
        f"print('LOADED', [m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}])\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "LOADED []"
    recs = [json.loads(l) for l in lines if l.startswith("{")]
    assert len(recs) == 1
    return recs[0]


def test_bench_reports_every_field(tiny_record):
    r = tiny_record
    for field in bench.FIELDS:
        assert field in r, field
        if field != "peak_mem_gib":  # CPU devices have no memory_stats(): null there
            assert r[field] is not None, field
    assert r["peak_mem_gib"] is None and r["host_rss_gib"] > 0
    assert r["xla_flags"] == ONE_DEVICE and r["scan_unroll"] == 1 and r["fused_projections"] is False
    assert r["freeze_relative_attention_bias"] is False and r["cast_kernels_before_scan"] is False
    assert (r["size"], r["algo"], r["batch"], r["precomputed_ref"]) == ("tiny", "dro_v", 4, False)
    assert r["step_s"] > 0 and r["skipped_nonfinite"] == 0.0
    assert r["tokens_per_s"] == pytest.approx(4 * 48 / r["step_s"], rel=1e-3)
    assert r["examples_per_s"] == pytest.approx(4 / r["step_s"], rel=1e-3)
    assert r["mfu"] == pytest.approx(r["flops_model"] / r["step_s"] / (r["peak_tflops"] * 1e12),
                                     rel=1e-2, abs=1e-4)  # stored to 4 decimals
    assert set(r["flops_breakdown"]) == {"policy", "value", "reference"}


def test_flops_formula_agrees_with_xla_cost_analysis(tiny_record):
    r = tiny_record
    lo, hi = XLA_OVER_MODEL
    assert lo <= r["flops_xla"] / r["flops_model"] <= hi, r
    # The traced program's dots: the formula plus the value head's pooling (2*B*S*D + 2*B*D).
    assert r["flops_jaxpr_dots"] == pytest.approx(r["flops_executed"], rel=2e-3)


ALGO_REF = [("dro_v", False), ("dro_v", True), ("kto", False), ("kto", True), ("sft", False)]


@pytest.mark.parametrize("algo,ref,remat", [
    (algo, ref, remat) for remat in ("none", "full", "dots_with_no_batch_dims_saveable")
    for algo, ref in ALGO_REF] + [("dro_v", False, "dots_with_no_batch_dims_and_attention_saveable"),
                                  ("dro_v:shared", True, "none"), ("dro_v:scalar", True, "full")])
def test_flops_formula_matches_traced_dots(algo, ref, remat):
    """Without compiling: the formula's 'executed' count equals the jaxpr's dot FLOPs."""
    algo, _, value_kind = algo.partition(":")
    value_kind = value_kind or "separate"
    bc = bench.BenchConfig(size="tiny", algo=algo, batch=4, inputs_len=24, targets_len=12,
                           precomputed_ref=ref, remat=remat, mesh="1,1", compile_only=True, value_kind=value_kind)
    built = bench.build_step(bc)
    dots = flops.jaxpr_dot_flops(bench.trace_step(built).jaxpr)
    cfg = built["cfg"]
    exe = flops.train_step_flops(cfg, algo, 4, 24, 12, precomputed_ref=ref, executed=True, value_kind=value_kind)
    model = flops.train_step_flops(cfg, algo, 4, 24, 12, precomputed_ref=ref, value_kind=value_kind)
    assert dots == pytest.approx(exe["total"], rel=2e-3)
    assert model["total"] <= exe["total"]
    if algo == "sft" or ref:
        assert "reference" not in model


def test_microbatches_keep_the_flops_and_cut_activation_memory():
    """--microbatches: the traced dots are the same work; XLA's memory analysis shrinks."""
    dots, mem = [], []
    for mb in (1, 4):
        bc = bench.BenchConfig(size="tiny", algo="dro_v", batch=16, inputs_len=128, targets_len=64,
                               microbatches=mb, mesh="1,1", compile_only=True, scan_layers=True)
        built = bench.build_step(bc)
        traced = bench.trace_step(built)
        dots.append(flops.jaxpr_dot_flops(traced.jaxpr))
        with bench._mesh_ctx(built["mesh"], built["rules"]):
            mem.append(bench._xla_mem_bytes(traced.lower().compile()))
    assert dots[0] == dots[1]
    assert mem[1] < 0.5 * mem[0], mem  # measured 46 MB vs 159 MB


def test_sweeps_reach_each_config_and_its_subprocess():
    """--remat and --scan_unroll lists multiply; a config's child argv parses back to itself."""
    a = bench.parse_args(["--sizes", "tiny", "--scan_layers", "--scan_unroll", "1,2",
                          "--remat", "none,full", "--microbatches", "2", "--no_jaxpr_flops",
                          "--fused_projections", "--freeze_relative_attention_bias",
                          "--cast_kernels_before_scan"])
    configs = bench.configs_from_args(a)
    assert [(c.remat, c.scan_unroll) for c in configs] == [
        ("none", 1), ("none", 2), ("full", 1), ("full", 2)]
    assert all(c.fused_projections and c.freeze_relative_attention_bias
               and c.cast_kernels_before_scan for c in configs)
    for bc in configs:
        assert bench.configs_from_args(bench.parse_args(bench._child_argv(bc))) == [bc]


def test_config_timeout_kills_even_a_single_configuration(tmp_path, capsys):
    """A stuck compile must not eat a whole GPU session: the limit holds for one config too."""
    out = tmp_path / "r.jsonl"
    # recorded, and (every configuration having failed) the exit status says so
    assert bench.main(TINY_ARGS + ["--config_timeout", "1", "--out", str(out)]) == 1
    rec = json.loads(out.read_text().strip())
    assert rec["error"] == "timed out after 1.0 s" and rec["size"] == "tiny"
    # the whole configuration, so a failed row says what it was
    assert (rec["attention"], rec["scan_layers"], rec["remat"]) == ("xla", False, "none")
    captured = capsys.readouterr()
    assert json.loads(captured.out.splitlines()[0]) == rec
    assert "every configuration failed (1)" in captured.err


def test_formula_by_hand():
    """T5-large numbers: forward ~ 2 * params * tokens plus attention."""
    cfg = bench.t5_config("large")
    b, s, t = 32, 512, 256
    fwd = flops.t5_forward_flops(cfg, b, s, t)
    n_enc = 24 * (4 * 1024 * 1024 + 3 * 1024 * 2816)
    n_dec = 24 * (6 * 1024 * 1024 + 3 * 1024 * 2816)  # self q,k,v,o; cross q,o; MLP
    n_cross_kv = 24 * 2 * 1024 * 1024  # cross-attention k, v run on the S encoder outputs
    attn = 24 * 4 * b * 16 * 64 * (s * s + t * t + t * s)
    assert fwd == 2 * b * (s * (n_enc + n_cross_kv) + t * n_dec + t * 1024 * 32128) + attn
    step = flops.train_step_flops(cfg, "dro_v", b, s, t, precomputed_ref=True)
    assert step["total"] == 3 * fwd + 3 * flops.encoder_forward_flops(cfg, b, s)


def test_compare_with_anchor_output(tmp_path):
    anchor = [{"algo": "dro", "size": "large", "params_M": 783.2, "batch": 32, "lin": 512,
               "lout": 256, "step_s": 2.0, "examples_per_s": 16.0, "tokens_per_s": 12288,
               "step_tflop": 300.0, "mfu": 0.19, "peak_mem_gib": 120.0},
              {"size": "xl", "error": "CUDA out of memory"}]
    (tmp_path / "anchor.json").write_text(json.dumps(anchor))
    ours = {"size": "large", "algo": "dro_v", "batch": 32, "inputs_len": 512, "targets_len": 256,
            "tokens_per_s": 36864.0, "mfu": 0.5, "peak_mem_gib": 40.0, "precomputed_ref": True,
            "device": "NVIDIA H200", "remat": "none", "attention": "cudnn",
            "freeze_relative_attention_bias": True}
    (tmp_path / "ours.jsonl").write_text("some log line\n" + json.dumps(ours) + "\n")
    rows = bench.compare(bench.read_records(str(tmp_path / "ours.jsonl")),
                         bench.read_records(str(tmp_path / "anchor.json")))
    assert len(rows) == 1 and rows[0]["ratio"] == 3.0
    assert rows[0]["freeze_relative_attention_bias"] is True  # a variant's row says which
    # The anchor's stdout (JSON lines after a version line) reads the same.
    (tmp_path / "anchor.jsonl").write_text("2.13.0 NVIDIA H200\n" + "\n".join(
        json.dumps(a) for a in anchor))
    assert bench.read_records(str(tmp_path / "anchor.jsonl")) == anchor
    table = bench.markdown_table([ours], rows)
    assert "| 3.0 |" in table and "frozen relative-position bias" in table
    lines = bench.anchor_command(["large", "tiny"], 32, ["kto"]).splitlines()
    assert lines[0].startswith("OUT=${OUT:-reports/gpu}")  # runnable without the device tool's $OUT
    ours = [l for l in lines if "--out $OUT/dro_jax.jsonl" in l]
    assert len(ours) == 1 and "--sizes large --algos kto --batch 32" in ours[0]
    assert "--inputs_len 512 --targets_len 256" in ours[0]  # the anchor's fixed lengths
    # and the anchor at half the batch too: its DRO-V T5-large runs out of memory at 32
    assert any("PLAN=large:32,large:16" in l and "tee $OUT/anchor.jsonl" in l for l in lines)
    tiny_only = bench.anchor_command(["tiny"], 8).splitlines()
    assert tiny_only[0].startswith("# the anchor knows small, base, large, xl only: large instead of tiny")
    assert "hf_t5_anchor.py" in "\n".join(lines)
    assert lines[-1].endswith("--compare $OUT/anchor.jsonl --results $OUT/dro_jax.jsonl")


def test_compare_falls_back_to_the_anchors_fastest_batch_when_ours_did_not_run():
    """The anchor's DRO-V T5-large runs out of memory at batch 32: its stdout then has no
    record there, only an error line without algo or batch. Our batch-32 row is compared with
    the anchor's fastest batch of that size and algo, and says which batch that was."""
    shape = {"lin": 512, "lout": 256}
    anchor = [dict(algo="kto", size="large", batch=32, tokens_per_s=26931, **shape),
              {"size": "large", "error": "CUDA out of memory"},
              dict(algo="kto", size="large", batch=16, tokens_per_s=23213, **shape),
              dict(algo="dro", size="large", batch=16, tokens_per_s=24547, **shape),
              dict(algo="dro", size="large", batch=8, tokens_per_s=20000, **shape),
              dict(algo="dro", size="base", batch=32, tokens_per_s=78998, **shape),
              dict(algo="dro", size="large", tokens_per_s=99999)]  # a partial record: not a row
    ours = [dict(size="large", algo="dro_v", batch=b, inputs_len=512, targets_len=256,
                 tokens_per_s=t, mfu=0.4, peak_mem_gib=30.0, precomputed_ref=True,
                 device="NVIDIA H200", remat="none", attention="cudnn", microbatches=1)
            for b, t in ((32, 73641.0), (8, 40000.0))]
    ours.append(dict(ours[0], size="xl"))  # no anchor record of that size: no row
    rows = bench.compare(ours, anchor)
    assert [(r["batch"], r["anchor_batch"], r["ratio"]) for r in rows] == [(32, 16, 3.0),
                                                                            (8, 8, 2.0)]
    table = bench.markdown_table(ours, rows)
    assert "| 24547 (its batch 16) | 3.0 |" in table and "| 20000 | 2.0 |" in table


def test_profile_of_the_real_step(tiny_record):
    """jax.profiler's trace of the tiny step parses into per-kernel and per-category times."""
    prof = tiny_record["profile"]
    assert os.path.isfile(prof["trace"]) and prof["where"] == "host"  # CPU: no device lines
    assert prof["ms_per_step"] > 0 and len(prof["top"]) > 3
    assert sum(c["share"] for c in prof["categories"].values()) == pytest.approx(1.0, abs=1e-3)
    assert prof["top"][0]["ms_per_step"] >= prof["top"][-1]["ms_per_step"]


def test_profile_summary_counts_gpu_stream_kernels_once(tmp_path):
    """On a GPU trace only the stream lines count: the 'XLA Modules'/'XLA Ops' lines repeat the
    same time, and host events are not device time."""
    import gzip
    meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind,
                                         "args": {"name": name}}
    x = lambda pid, tid, name, dur: {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": 0,
                                     "dur": dur}
    events = [meta(1, 0, "process_name", "/device:GPU:0"), meta(2, 0, "process_name", "/host:CPU"),
              meta(1, 7, "thread_name", "Stream #7(compute)"), meta(1, 8, "thread_name", "XLA Ops"),
              meta(1, 9, "thread_name", "XLA Modules"),
              x(1, 7, "nvjet_hsh_256x128", 3000), x(1, 7, "cudnn_generated_fort_native_sdpa", 1000),
              x(1, 7, "loop_multiply_fusion", 500), x(1, 7, "nvjet_hsh_256x128", 3000),
              x(1, 7, "memcpy", 500), x(1, 7, "loop_dynamic_update_slice_fusion_3", 400),
              x(1, 7, "loop_broadcast_fusion_29", 200), x(1, 7, "gemm_fusion_dot_174", 400),
              x(1, 8, "dot.12", 6000), x(1, 9, "jit_train_step", 8000), x(2, 0, "ThunkExecutor", 9e6)]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    prof = bench.profile_summary(str(tmp_path), steps=2)
    assert prof["where"] == "device"
    assert prof["ms_per_step"] == pytest.approx(4.5)  # 9000 us over 2 steps
    cats = {k: v["ms_per_step"] for k, v in prof["categories"].items()}
    assert cats == pytest.approx({"matmul": 3.2, "attention": 0.5, "fusion": 0.25,
                                  "copy/memset": 0.25, "update-slice": 0.2, "broadcast": 0.1})
    assert prof["top"][0] == {"op": "nvjet_hsh_256x128", "ms_per_step": 3.0, "share": 0.6667}


@pytest.mark.parametrize("bad,message", [
    (["--mesh", "abc"], "--mesh: expected data,model"),
    (["--remat", "none,bogus"], "--remat: unknown policy 'bogus'"),
    (["--batch", "2", "--microbatches", "3"], "--batch 2 does not split into --microbatches 3"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--compare", "/nonexistent.json"], "--compare=/nonexistent.json: no such file"),
    (["--scan_unroll", "x"], "--scan_unroll: expected a comma list of int"),
    (["--scan_unroll", "0"], "--scan_unroll: layers per iteration must be >= 1"),
    (["--scan_unroll", "2"], "--scan_unroll 2 needs --scan_layers"),
    (["--batch", "3.5"], "--batch: expected a comma list of int"),
    (["--sizes", "huge"], "--sizes: unknown size 'huge'"),
    (["--sizes", ","], "--sizes: empty list"),
    (["--algos", "dpo"], "--algos: unknown algo 'dpo'"),
    (["--peak_tflops", "-1"], "--peak_tflops must be > 0, got -1.0"),
    (["--peak_tflops", "0"], "--peak_tflops must be > 0, got 0.0"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--mesh", "-1,x"], "--mesh: expected data,model"),  # a negative value after a space too
    (["--config_timeout", "0"], "--config_timeout must be > 0 seconds"),
    (["--out", "/nonexistent/dir/x.jsonl"], "--out=/nonexistent/dir/x.jsonl: not a file in a writable folder"),
    (["--results", __file__], "--results is read only with --compare"),
])
def test_bad_flags_stop_before_any_compile(bad, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--sizes", "tiny", *bad])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: python -m dro_jax.bench: ") and message in err[0], err


def test_mesh_takes_a_negative_first_axis_after_a_space():
    """The help's own example form, `--mesh -1,1`, which argparse alone reads as a flag."""
    assert bench.parse_args(["--sizes", "tiny", "--mesh", "-1,1"]).mesh == "-1,1"
    assert bench.parse_args(["--mesh=-1,2"]).mesh == "-1,2"


def _anchor_line(**kw):
    return dict(dict(algo="dro", size="large", batch=16, lin=512, lout=256, tokens_per_s=24547), **kw)


def _our_line(**kw):
    return dict(dict(size="large", algo="dro_v", batch=32, inputs_len=512, targets_len=256,
                     tokens_per_s=73641.0, mfu=0.4, precomputed_ref=True, device="NVIDIA H200"), **kw)


@pytest.mark.parametrize("anchor_text,ours_text,message", [
    ('[{"algo": "dro", "size": "lar', None, "anchor.json:1: not a valid JSON list"),
    (None, json.dumps(_anchor_line()), "record 1 is not a dro_jax.bench record (missing device, "
                                       "inputs_len, targets_len, precomputed_ref, mfu) (the anchor's output?"),
    (None, json.dumps({k: v for k, v in _our_line().items() if k != "device"}), "(missing device)"),
    (None, json.dumps(_our_line(tokens_per_s="73641")), "(tokens_per_s '73641')"),
    (None, '{"size": "large", "error": "out of memory"}', "no timed dro_jax.bench record in it"),
    (b"\xff\xfe\x00binary", None, "anchor.json: cannot be read as text (UnicodeDecodeError"),
    (json.dumps([_anchor_line(tokens_per_s="24547")]), None,
     "no anchor record of {anchor} matches a timed record here"),
    (json.dumps([_anchor_line(size="xl")]), None, "no anchor record of {anchor} matches"),
])
def test_compare_refuses_unusable_files_in_one_line(tmp_path, capsys, anchor_text, ours_text, message):
    anchor, ours = tmp_path / "anchor.json", tmp_path / "ours.jsonl"
    anchor_text = json.dumps([_anchor_line()]) if anchor_text is None else anchor_text
    (anchor.write_bytes if isinstance(anchor_text, bytes) else anchor.write_text)(anchor_text)
    ours.write_text((json.dumps(_our_line()) if ours_text is None else ours_text) + "\n")
    code = bench.main(["--compare", str(anchor), "--results", str(ours)])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code in (1, 2) and len(err) == 1, err
    assert err[0].startswith("error: ") and message.format(anchor=anchor) in err[0], err
    # and the matching pair gives its ratio
    anchor.write_text(json.dumps([_anchor_line()]))
    ours.write_text(json.dumps(_our_line()) + "\n")
    assert bench.main(["--compare", str(anchor), "--results", str(ours)]) == 0
    assert '"ratio": 3.0' in capsys.readouterr().out
