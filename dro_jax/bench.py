"""Throughput / memory benchmark of the real jitted train step on synthetic batches.

    python -m dro_jax.bench --sizes tiny,small --algos dro_v,kto,sft --batch 8 \
        --inputs_len 128 --targets_len 64 --precomputed_ref both

One JSON line per configuration (size x algorithm x batch x reference mode) on stdout:
  step_s, tokens_per_s (= batch * (inputs_len + targets_len) / step_s, the anchor's
  definition: every position counts, the synthetic batches have no padding),
  examples_per_s, flops_model (dro_jax.flops.train_step_flops: matmul FLOPs the
  algorithm needs, see that module), flops_executed (the same formula with remat
  recomputation), flops_xla (XLA's cost analysis of
  the compiled step: every op, elementwise and optimiser included; a while loop's body
  once), flops_jaxpr_dots (dot_general FLOPs of the traced step, scans unrolled),
  mfu = flops_model / step_s / (peak x GPUs of the mesh; on CPU the peak is the machine's), peak_mem_gib (device `memory_stats()` peak, process
  lifetime; null on CPU, which has none), host_rss_gib (peak resident set of the process:
  on CPU this is where the memory goes), xla_mem_gib (XLA's memory analysis of the
  compiled step: arguments + outputs + temporaries - donated aliases).

By default the network is unrolled (a Python loop over layers), so the cost analysis sees
every layer. --scan_layers compiles one layer body under `scan` (far shorter compiles for
large sizes); the cost analysis then counts that body once, the jaxpr count does not.
Several configurations run in one subprocess each (a fresh peak memory, an
out-of-memory error stays local) unless --no_isolate.

Peak FLOP/s (--peak_tflops): 790 on GPU, the H100/H200 dense bf16 peak that issue 7 and the
PyTorch anchor use (NVIDIA's datasheet says 989 for the SXM parts). On CPU the default is
nominal: cores * 2.5 GHz * 64 fp32 FLOP/cycle (two AVX-512 FMA units), 0.32 TFLOP/s on
2 cores; CPU MFU only tracks regressions.

Side by side with the PyTorch anchor (../shared/bench/hf_t5_anchor.py): `--anchor` prints
the commands (ours, the anchor, the comparison); `--compare anchor.json --results ours.jsonl` prints the tokens/s ratios.

Imports only jax, flax, optax, numpy and dro_jax's model code (no TensorFlow, seqio, gin
or clu), so it runs on a bare accelerator host.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import re
import os
import resource
import subprocess
import sys
import time
from typing import Any

# T5 v1.1 sizes (as in ../shared/bench/hf_t5_anchor.py and the t5x gin files); "tiny" is a
# CPU smoke size. Keys are dro_jax.network.T5Config fields. gin_configs/models/<size>.gin,
# where present, overrides these (read as text: gin itself is not imported).
V11 = dict(vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
           relative_attention_num_buckets=32, relative_attention_max_distance=128)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(V11, vocab_size=384, d_model=64, d_kv=16, d_ff=128, num_heads=4,
                 num_encoder_layers=2, num_decoder_layers=2),
    "small": dict(V11, d_model=512, d_kv=64, d_ff=1024, num_heads=6,
                  num_encoder_layers=8, num_decoder_layers=8),
    "base": dict(V11, d_model=768, d_kv=64, d_ff=2048, num_heads=12,
                 num_encoder_layers=12, num_decoder_layers=12),
    "large": dict(V11, d_model=1024, d_kv=64, d_ff=2816, num_heads=16,
                  num_encoder_layers=24, num_decoder_layers=24),
    "xl": dict(V11, d_model=2048, d_kv=64, d_ff=5120, num_heads=32,
               num_encoder_layers=24, num_decoder_layers=24),
    "xxl": dict(V11, d_model=4096, d_kv=64, d_ff=10240, num_heads=64,
                num_encoder_layers=24, num_decoder_layers=24),
}
ALGORITHMS = ("dro_v", "kto", "sft")
GPU_PEAK_TFLOPS = 790.0
CPU_GHZ, CPU_FLOP_PER_CYCLE = 2.5, 64
# T5Config's on/off runtime switches that the benchmark exposes as flags of the same name:
# name -> (profile folder tag, README table label, --help).
SWITCHES = {
    "fused_projections": (
        "fused", "fused projections",
        "one matmul for q/k/v (self-attention), for k/v (cross-attention) and for wi_0/wi_1 "
        "(gated MLP); same parameters, same numbers up to rounding"),
    "freeze_relative_attention_bias": (
        "frozenbias", "frozen relative-position bias",
        "the relative-position bias tables get no gradient (cuDNN attention then skips "
        "computing it); changes training, not the forward pass"),
    "cast_kernels_before_scan": (
        "castonce", "kernels cast before the scan",
        "with --scan_layers: the stacked kernels are cast to the compute dtype once before "
        "the layer loop, not per layer; same numbers, bfloat16 kernel gradients in the loop"),
}
FIELDS = ("device", "n_devices", "size", "algo", "precomputed_ref", "batch", "inputs_len",
          "targets_len", "dtype", "remat", "attention", "scan_layers", "scan_unroll", *SWITCHES,
          "microbatches", "mesh",
          "optimizer", "params_M", "value_params_M", "compile_s", "step_s", "tokens_per_s", "examples_per_s",
          "flops_model", "flops_executed", "flops_xla", "flops_jaxpr_dots", "xla_over_model",
          "step_tflop", "peak_tflops", "mfu", "peak_mem_gib", "host_rss_gib", "xla_mem_gib",
          "loss", "skipped_nonfinite", "xla_flags")
# The anchor lives beside the checkout; a device machine gets the checkout's shared/ only.
ANCHOR_PATHS = ("../shared/bench/hf_t5_anchor.py", "shared/bench/hf_t5_anchor.py")
ANCHOR_SIZES = ("small", "base", "large", "xl")  # the sizes hf_t5_anchor.py knows


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    size: str = "tiny"
    algo: str = "dro_v"
    batch: int = 8
    inputs_len: int = 512
    targets_len: int = 256
    precomputed_ref: bool = False
    dtype: str = "auto"            # auto: bfloat16 on accelerators, float32 on CPU
    remat: str = "none"
    attention: str = "xla"
    scan_layers: bool = False
    scan_unroll: int = 1           # layers per scan iteration (with scan_layers)
    fused_projections: bool = False  # one matmul for q/k/v, cross k/v, wi_0/wi_1
    freeze_relative_attention_bias: bool = False  # no bias gradient (cuDNN skips it)
    cast_kernels_before_scan: bool = False  # stacked kernels cast once, before the layer loop
    microbatches: int = 1          # gradient accumulation inside the step
    mesh: str = "-1,1"             # data,model
    fsdp: bool = False
    optimizer: str = "adafactor"
    value_kind: str = "separate"
    peak_tflops: float | None = None
    steps: int = 5
    warmup: int = 2
    compile_only: bool = False
    profile_dir: str | None = None
    jaxpr_flops: bool = True
    seed: int = 0


GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "gin_configs", "models")


def gin_size(size: str) -> dict[str, Any] | None:
    """The T5Config bindings of gin_configs/models/<size>.gin, read without gin (simple
    `name = literal` lines under `network.T5Config:`); None if the file is absent.
    Its dtype is ignored: the benchmark chooses the dtype."""
    import ast
    path = os.path.join(GIN_DIR, f"{size}.gin")
    if not os.path.exists(path):
        return None
    out, inside = {}, False
    for line in open(path):
        stripped = line.split("#")[0].rstrip()
        if stripped.strip() == "network.T5Config:":
            inside = True
            continue
        if inside and stripped.startswith((" ", "\t")) and "=" in stripped:
            key, value = (x.strip() for x in stripped.split("=", 1))
            if key != "dtype":
                out[key] = ast.literal_eval(value)
        elif stripped.strip():
            inside = False
    return out


def cpu_peak_tflops() -> float:
    return (os.cpu_count() or 1) * CPU_GHZ * CPU_FLOP_PER_CYCLE / 1e3


def t5_config(size: str, *, dtype: str = "float32", remat: str = "none", attention: str = "xla",
              scan_layers: bool = False, scan_unroll: int = 1, **switches: bool):
    """The T5Config of a size; `switches` are SWITCHES names (default off)."""
    from dro_jax import network
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    unknown = sorted(set(switches) - set(SWITCHES))
    if unknown:
        raise ValueError(f"unknown switches {unknown}; known: {list(SWITCHES)}")
    fields = {**SIZES[size], **(gin_size(size) or {})}  # the repo's gin sizes win
    return network.T5Config(**fields, dtype=dtype, remat_policy=remat,
                            attention_impl=attention, scan_layers=scan_layers,
                            scan_unroll=scan_unroll, **switches)


def _switches(obj) -> dict[str, bool]:
    """SWITCHES' values on a BenchConfig or an argparse namespace."""
    return {name: bool(getattr(obj, name)) for name in SWITCHES}


def make_model(cfg, algo: str, value_kind: str = "separate"):
    from dro_jax import models
    if algo == "dro_v":
        return models.DROModel(cfg, tau=1.0, value_kind=value_kind)
    if algo == "kto":
        return models.KTOModel(cfg, beta=0.1)
    if algo == "sft":
        return models.FilteredSFTModel(cfg)
    raise ValueError(f"algo must be one of {ALGORITHMS}, got {algo!r}")


def synthetic_batch(cfg, algo: str, batch: int, inputs_len: int, targets_len: int, *,
                    precomputed_ref: bool, seed: int = 0):
    """Full-length random tokens (no padding), EOS last, alternating thumbs up/down."""
    import numpy as np
    rng = np.random.default_rng(seed)
    v = cfg.vocab_size
    enc = rng.integers(2, v, (batch, inputs_len), dtype=np.int32)
    tgt = rng.integers(2, v, (batch, targets_len), dtype=np.int32)
    enc[:, -1] = tgt[:, -1] = cfg.eos_id
    dec_in = np.zeros_like(tgt)
    dec_in[:, 1:] = tgt[:, :-1]
    out = {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": np.ones_like(tgt),
        "rewards": np.where(np.arange(batch) % 2 == 0, 1.0, -1.0).astype(np.float32),
    }
    if precomputed_ref and algo != "sft":
        lp = -np.log(v) * targets_len
        out["ref_logprobs"] = (lp + rng.normal(size=batch)).astype(np.float32)
        if algo == "kto":
            out["kl_ref_logprobs"] = (lp + rng.normal(size=batch)).astype(np.float32)
    return out


def _cost(compiled) -> dict:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _xla_mem_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
    except Exception:
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def _device_peak_bytes(devices) -> int | None:
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _gib(x):
    return None if x is None else round(x / 2**30, 3)


def _count(tree) -> int:
    import jax
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


@contextlib.contextmanager
def _mesh_ctx(mesh, rules):
    """The trainer's context: the mesh and the logical-axis rules of activation constraints."""
    import flax.linen as nn
    from dro_jax import sharding
    with sharding.use_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def build_step(bc: BenchConfig, *, abstract: bool | None = None) -> dict[str, Any]:
    """The real train step of a configuration: model, mesh, state, batch and jitted step.

    abstract (default bc.compile_only): state and batch as shapes with shardings only.
    """
    import jax
    from dro_jax import optim, sharding, train_state

    abstract = bc.compile_only if abstract is None else abstract
    platform = jax.default_backend()
    dtype = bc.dtype if bc.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
    cfg = t5_config(bc.size, dtype=dtype, remat=bc.remat, attention=bc.attention,
                    scan_layers=bc.scan_layers, scan_unroll=bc.scan_unroll, **_switches(bc))
    model = make_model(cfg, bc.algo, bc.value_kind)
    with_ref = bc.algo != "sft" and not bc.precomputed_ref

    data, mdl = (int(x) for x in bc.mesh.split(","))
    mesh_cfg = sharding.MeshConfig(data=data, model=mdl, fsdp=bc.fsdp)
    mesh = sharding.create_mesh(mesh_cfg)
    rules = sharding.logical_axis_rules(mesh_cfg)
    txs, scheds = {}, {}
    for k in train_state.NETWORKS:
        txs[k], scheds[k] = optim.make_optimizer(
            optim.OptimizerConfig(name=bc.optimizer, learning_rate=1e-6, warmup_steps=0), 1000)
    host_batch = synthetic_batch(cfg, bc.algo, bc.batch, bc.inputs_len, bc.targets_len,
                                 precomputed_ref=bc.precomputed_ref, seed=bc.seed)
    shapes = {k: v.shape for k, v in host_batch.items()}
    step_fn = train_state.make_train_step(model, txs, scheds, seed=bc.seed,
                                          microbatches=bc.microbatches,
                                          dropout=cfg.dropout_rate > 0)
    if abstract:  # nothing materialised: shapes and shardings only
        _, state, state_sh = train_state.abstract_state_and_shardings(
            model, txs, shapes, mesh, rules, seed=bc.seed, with_ref=with_ref)
        bsh = sharding.batch_sharding(mesh)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh)
                 for k, v in host_batch.items()}
    else:
        state, state_sh = train_state.create_state(model, txs, shapes, mesh, rules,
                                                   seed=bc.seed, with_ref=with_ref)
        batch = sharding.host_batch_to_global(host_batch, mesh)
    jitted = train_state.jit_train_step(step_fn, state_sh, mesh)
    return dict(cfg=cfg, model=model, dtype=dtype, with_ref=with_ref, mesh=mesh, rules=rules,
                state=state, batch=batch, jitted=jitted)


def trace_step(built: dict):
    """jax.stages.Traced of the jitted train step (under the trainer's mesh context)."""
    with _mesh_ctx(built["mesh"], built["rules"]):
        return built["jitted"].trace(built["state"], built["batch"])


def run_config(bc: BenchConfig) -> dict[str, Any]:
    """Builds, compiles and times one configuration; returns its result record."""
    import jax
    import numpy as np
    from dro_jax import flops as flops_lib

    platform = jax.default_backend()
    peak = bc.peak_tflops or (cpu_peak_tflops() if platform == "cpu" else GPU_PEAK_TFLOPS)
    # MFU against every chip of the mesh (peak_tflops is one chip's; on CPU the whole machine's).
    t0 = time.perf_counter()
    built = build_step(bc)
    cfg, mesh, rules, state, batch = (built[k] for k in ("cfg", "mesh", "rules", "state", "batch"))
    dtype, with_ref = built["dtype"], built["with_ref"]
    traced = trace_step(built)
    jaxpr_dots = flops_lib.jaxpr_dot_flops(traced.jaxpr) if bc.jaxpr_flops else None
    with _mesh_ctx(mesh, rules):
        compiled = traced.lower().compile()
    compile_s = time.perf_counter() - t0  # to first runnable: init, reference copy, trace and compile

    params = state.params
    formula = flops_lib.train_step_flops(cfg, bc.algo, bc.batch, bc.inputs_len, bc.targets_len,
                                         precomputed_ref=not with_ref, value_kind=bc.value_kind)
    executed = flops_lib.train_step_flops(cfg, bc.algo, bc.batch, bc.inputs_len, bc.targets_len,
                                          precomputed_ref=not with_ref, value_kind=bc.value_kind,
                                          executed=True)
    xla_flops = _cost(compiled).get("flops")
    rec: dict[str, Any] = dict(
        device=jax.devices()[0].device_kind, n_devices=mesh.size, size=bc.size, algo=bc.algo,
        precomputed_ref=bool(bc.precomputed_ref and bc.algo != "sft"), batch=bc.batch,
        inputs_len=bc.inputs_len, targets_len=bc.targets_len, dtype=dtype, remat=bc.remat,
        attention=bc.attention, scan_layers=bc.scan_layers, scan_unroll=bc.scan_unroll,
        # What the step did: in float32 there is nothing to cast.
        **{**_switches(bc),
           "cast_kernels_before_scan": bc.cast_kernels_before_scan and dtype != "float32"},
        microbatches=bc.microbatches, xla_flags=os.environ.get("XLA_FLAGS", ""),
        mesh=f"{mesh.shape['data']}x{mesh.shape['model']}"
        + ("+fsdp" if bc.fsdp else ""), optimizer=bc.optimizer,
        params_M=round(_count(params["policy"]) / 1e6, 2),
        value_params_M=round(_count(params["value"]) / 1e6, 2),
        compile_s=round(compile_s, 2),
        flops_model=formula["total"], flops_breakdown={k: v for k, v in formula.items()
                                                       if k != "total"},
        flops_executed=executed["total"],
        flops_xla=None if xla_flops is None else int(xla_flops),
        flops_jaxpr_dots=jaxpr_dots,
        xla_over_model=None if not xla_flops else round(xla_flops / formula["total"], 4),
        step_tflop=round(formula["total"] / 1e12, 4), peak_tflops=peak,
        xla_mem_gib=_gib(_xla_mem_bytes(compiled)),
    )
    if bc.compile_only:
        rec.update(step_s=None, tokens_per_s=None, examples_per_s=None, mfu=None, loss=None,
                   skipped_nonfinite=None)
    else:
        with _mesh_ctx(mesh, rules):
            metrics = None
            for _ in range(bc.warmup):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(state)
            t = time.perf_counter()
            for _ in range(bc.steps):
                state, metrics = compiled(state, batch)
            jax.block_until_ready(state)
            dt = (time.perf_counter() - t) / max(bc.steps, 1)
        if bc.profile_dir:
            tag = (f"{bc.size}_{bc.algo}_b{bc.batch}_{'pre' if bc.precomputed_ref else 'live'}"
                   f"_{bc.remat}_{bc.attention}{'_scan' if bc.scan_layers else ''}"
                   + (f"{bc.scan_unroll}" if bc.scan_layers and bc.scan_unroll > 1 else "")
                   + "".join(f"_{tag}" for name, (tag, _, _) in SWITCHES.items()
                             if getattr(bc, name))
                   + (f"_mb{bc.microbatches}" if bc.microbatches > 1 else ""))
            state, rec["profile"] = profile_steps(compiled, state, batch, mesh, rules,
                                                  os.path.join(bc.profile_dir, tag))
        m = jax.device_get(metrics)
        rec.update(step_s=float(f"{dt:.6g}"),  # 6 significant digits: a tiny CPU step is milliseconds
                   tokens_per_s=round(bc.batch * (bc.inputs_len + bc.targets_len) / dt, 1),
                   examples_per_s=round(bc.batch / dt, 2),
                   mfu=round(formula["total"] / dt / (peak * 1e12 * (1 if platform == "cpu" else mesh.size)), 4),
                   loss=float(np.asarray(m["loss/total"])),
                   skipped_nonfinite=float(np.asarray(m["skipped_nonfinite"])))
    rec["peak_mem_gib"] = _gib(_device_peak_bytes(jax.local_devices()))
    rec["host_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return rec


# ----------------------------------------------------------------- profile


PROFILE_STEPS = 2
# Kernel-name patterns per category, lower case (cuBLAS/cuDNN/XLA names on NVIDIA GPUs).
# Under nn.scan each layer's saved activations are written into stacked buffers
# (dynamic-update-slice) that XLA zero-fills first (broadcast): their own categories, since on
# an H200 they were a quarter of the large step.
_CATEGORIES = (("attention", ("cudnn", "fmha", "flash", "attention")),
               ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "dot", "matmul")),
               ("update-slice", ("dynamic_update_slice", "dynamic-update-slice")),
               ("broadcast", ("broadcast",)),
               ("fusion", ("fusion",)),
               ("copy/memset", ("copy", "memset", "memcpy", "transpose")))


def profile_steps(compiled, state, batch, mesh, rules, profile_dir: str):
    """Runs PROFILE_STEPS steps under jax.profiler (TensorBoard's profile plugin reads
    `profile_dir`). Returns (the new state: the old one was donated, profile_summary)."""
    import jax
    with _mesh_ctx(mesh, rules), jax.profiler.trace(profile_dir, create_perfetto_trace=True):
        for _ in range(PROFILE_STEPS):
            state, _ = compiled(state, batch)
        jax.block_until_ready(state)
    return state, profile_summary(profile_dir, PROFILE_STEPS)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_summary(profile_dir: str, steps: int = 1, top: int = 15) -> dict:
    """Device time per kernel (per step, ms) and per category from the newest Perfetto trace
    under profile_dir. Only device processes count ('/device:...'); on CPU, where there are
    none, the host's XLA ops count instead."""
    import collections
    import glob
    import gzip
    paths = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True), key=os.path.getmtime)
    if not paths:
        return {"error": f"no perfetto_trace.json.gz under {profile_dir}"}
    with gzip.open(paths[-1], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, name in procs.items() if name.startswith("/device:")}
    # On a GPU the kernels are on the "Stream #..." lines; the "XLA Modules"/"XLA Ops" lines
    # repeat the same time at coarser levels.
    streams = {k for k, name in threads.items() if k[0] in device and name.startswith("Stream")}

    def counted(e) -> bool:
        if e.get("ph") != "X" or str(e.get("name", "")).startswith("$"):  # "$": Python frames
            return False
        if streams:
            return (e.get("pid"), e.get("tid")) in streams
        return e.get("pid") in device if device else True

    per_op: collections.Counter = collections.Counter()
    for e in filter(counted, events):
        per_op[e["name"]] += float(e.get("dur", 0.0))  # microseconds
    total = sum(per_op.values()) or 1.0
    cats: collections.Counter = collections.Counter()
    for name, us in per_op.items():
        cats[_category(name)] += us
    ms = lambda us: round(us / 1e3 / max(steps, 1), 3)
    return {
        "trace": paths[-1], "where": "device" if device else "host",
        "ms_per_step": ms(total),
        "categories": {k: {"ms_per_step": ms(v), "share": round(v / total, 4)}
                       for k, v in cats.most_common()},
        "top": [{"op": k, "ms_per_step": ms(v), "share": round(v / total, 4)}
                for k, v in per_op.most_common(top)],
    }


# ----------------------------------------------------------------- anchor comparison


def anchor_command(sizes, batch: int, algos=("dro_v",)) -> str:
    """Shell lines to run on the GPU machine: this benchmark, the anchor on the same GPU, then
    the tokens/s ratios. The anchor knows small..xl, always times its kto and dro steps, at 512
    input / 256 target tokens, so our lines use those lengths too."""
    known = [s for s in sizes if s in ANCHOR_SIZES]
    notes = [] if known else [f"# the anchor knows {', '.join(ANCHOR_SIZES)} only: large instead of "
                              f"{', '.join(sizes)}"]
    known = known or ["large"]
    # Also half the batch: the anchor's DRO-V step runs out of memory at T5-large batch 32 (even
    # on 140 GiB), and `compare` then takes its fastest batch that ran.
    batches = [batch] + ([batch // 2] if batch > 1 else [])
    plan = ",".join(f"{s}:{b}" for s in known for b in batches)
    find = " ".join(ANCHOR_PATHS)
    return "\n".join(notes + [
        "OUT=${OUT:-reports/gpu}; mkdir -p $OUT",
        f"python3 -m dro_jax.bench --sizes {','.join(known)} --algos {','.join(algos)} --batch {batch} "
        "--inputs_len 512 --targets_len 256 --scan_layers --attention cudnn --out $OUT/dro_jax.jsonl",
        f"A=$(ls {find} 2>/dev/null | head -1)",
        f"PLAN={plan} python3 $A | tee $OUT/anchor.jsonl",
        "python3 -m dro_jax.bench --compare $OUT/anchor.jsonl --results $OUT/dro_jax.jsonl",
    ])


def read_records(path: str) -> list[dict]:
    """A JSON list (the anchor's $OUT/anchor_hf_t5.json) or JSON lines (stdout of either);
    lines that are not JSON objects (logs around them) are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchInputError(f"{path}: cannot be read as text ({type(e).__name__}: {e})") from None
    if text.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchInputError(f"{path}:{e.lineno}: not a valid JSON list ({e.msg})") from None
        return [r for r in records if isinstance(r, dict)]
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def compare(ours: list[dict], anchor: list[dict]) -> list[dict]:
    """tokens/s ratio of each of our records to the anchor's of the same size, algo and lengths.

    The anchor at our batch when it ran; otherwise (it ran out of memory there, as its DRO-V
    T5-large does at batch 32 even on 140 GiB) its fastest batch, named in `anchor_batch`.
    """
    algo_map = {"dro": "dro_v", "kto": "kto"}
    # Records without the fields a comparison needs (the anchor's notes, partial lines) are not rows.
    ran = [a for a in anchor if _positive(a.get("tokens_per_s")) and a.get("algo") in algo_map
           and all(k in a for k in ("size", "lin", "lout", "batch"))]
    rows = []
    for o in ours:
        if not _positive(o.get("tokens_per_s")):
            continue
        same = [a for a in ran
                if (a["size"], algo_map[a["algo"]], a["lin"], a["lout"])
                == (o.get("size"), o.get("algo"), o.get("inputs_len"), o.get("targets_len"))]
        if not same:
            continue
        at_batch = [a for a in same if a["batch"] == o.get("batch")]
        a = at_batch[0] if at_batch else max(same, key=lambda r: r["tokens_per_s"])
        rows.append(dict(
            size=o["size"], algo=o["algo"], batch=o["batch"], anchor_batch=a["batch"],
            lin=a["lin"], lout=a["lout"], precomputed_ref=o.get("precomputed_ref"),
            remat=o.get("remat"), attention=o.get("attention"),
            microbatches=o.get("microbatches", 1), device=o.get("device"),
            **{k: o.get(k) for k in ("scan_layers", "scan_unroll", *SWITCHES, "xla_flags")},
            tokens_per_s=o["tokens_per_s"], anchor_tokens_per_s=a["tokens_per_s"],
            ratio=round(o["tokens_per_s"] / a["tokens_per_s"], 3),
            mfu=o.get("mfu"), anchor_mfu=a.get("mfu"),
            mem_gib=o.get("peak_mem_gib"), anchor_mem_gib=a.get("peak_mem_gib")))
    return rows


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0


class BenchInputError(ValueError):
    """A --compare / --results file that cannot be used (one line for the user)."""


# What a record of this benchmark has (and the table prints).
RECORD_KEYS = ("device", "size", "algo", "batch", "inputs_len", "targets_len", "precomputed_ref",
               "tokens_per_s", "mfu")


def check_our_records(path: str, records: list[dict]) -> None:
    """Every timed record of --results must be one of ours: the anchor's output given there
    (the two files swapped) or a hand-edited line would otherwise end in a KeyError."""
    timed = [r for r in records if "error" not in r and r.get("tokens_per_s") is not None]  # not compile_only
    if not timed:
        raise BenchInputError(f"--results {path}: no timed dro_jax.bench record in it")
    for i, r in enumerate(timed):
        missing = [k for k in RECORD_KEYS if k not in r]
        if missing or not _positive(r["tokens_per_s"]):
            hint = " (the anchor's output? --compare takes the anchor's, --results ours)" if "lin" in r else ""
            what = f"missing {', '.join(missing)}" if missing else f"tokens_per_s {r['tokens_per_s']!r}"
            raise BenchInputError(f"--results {path}: record {i + 1} is not a dro_jax.bench record "
                                  f"({what}){hint}")


def markdown_table(records: list[dict], anchor_rows: list[dict] | None = None) -> str:
    anchor_by = {(r["size"], r["algo"], r["batch"], r["tokens_per_s"]): r
                 for r in (anchor_rows or [])}
    head = ("| device | size | algorithm | batch | in/out | ref | step | tokens/s | MFU | memory GiB "
            "| anchor tokens/s (same run) | ratio |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in records:
        if not r.get("tokens_per_s"):
            continue
        a = anchor_by.get((r["size"], r["algo"], r["batch"], r["tokens_per_s"]))
        a_tok = "needs GPU run" if not a else (
            f"{a['anchor_tokens_per_s']}" + ("" if a["anchor_batch"] == r["batch"]
                                             else f" (its batch {a['anchor_batch']})"))
        mem = r.get("peak_mem_gib")
        mem_s = f"{mem}" if mem is not None else f"{r.get('host_rss_gib')} (host RSS)"
        ref = "n/a" if r["algo"] == "sft" else ("precomputed" if r["precomputed_ref"] else "live")
        step = ", ".join([r.get("attention", "xla"), f"remat {r.get('remat', 'none')}"]
                         + ([f"scanned, unroll {r['scan_unroll']}" if r.get("scan_unroll", 1) > 1
                              else "scanned"] if r.get("scan_layers") else [])
                         + [label for name, (_, label, _) in SWITCHES.items() if r.get(name)]
                         + ([f"{r['microbatches']} microbatches"] if r.get("microbatches", 1) > 1 else [])
                         + ([f"XLA_FLAGS {r['xla_flags'].strip()}"] if r.get("xla_flags", "").strip()
                            else []))
        lines.append(
            f"| {r['device']} | {r['size']} | {r['algo']} | {r['batch']} | "
            f"{r['inputs_len']}/{r['targets_len']} | {ref} | {step} | {r['tokens_per_s']:.0f} | "
            f"{100 * r['mfu']:.1f}% | {mem_s} | "
            f"{a_tok} | "
            f"{a['ratio'] if a else '-'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------- CLI


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def _csv(s, typ=str, flag: str = ""):
    try:
        return [typ(x) for x in str(s).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{flag or 'a list flag'}: expected a comma list of {typ.__name__}, "
                         f"got {s!r}") from None


def _bool_modes(s: str) -> list[bool]:
    return {"true": [True], "false": [False], "both": [False, True]}[s.lower()]


def parse_args(argv=None):
    from dro_jax import network  # REMAT_POLICIES; network imports only jax/flax/numpy
    p = _OneLineParser(prog="python -m dro_jax.bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", "--size", default="tiny", help=f"comma list of {list(SIZES)}")
    p.add_argument("--algos", "--algo", default="dro_v", help=f"comma list of {ALGORITHMS}")
    p.add_argument("--batch", default="8", help="batch size(s), comma list")
    p.add_argument("--inputs_len", type=int, default=512)
    p.add_argument("--targets_len", type=int, default=256)
    p.add_argument("--precomputed_ref", nargs="?", const="true", default="false",
                   choices=["true", "false", "both"],
                   help="reference log-probs as a batch feature (true), or a frozen reference "
                        "policy scored each step (false); both runs each")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--remat", default="none", help=f"comma list of {network.REMAT_POLICIES}")
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    p.add_argument("--scan_layers", action="store_true",
                   help="nn.scan over layers: compiles one layer body (minutes less for large "
                        "sizes); XLA's cost analysis then counts that body once")
    p.add_argument("--scan_unroll", default="1",
                   help="with --scan_layers: layers per scan iteration, comma list (XLA unrolls "
                        "the loop body that many times)")
    for name, (_, _, help_text) in SWITCHES.items():
        p.add_argument(f"--{name}", action="store_true", help=help_text)
    p.add_argument("--microbatches", type=int, default=1,
                   help="split each batch into this many microbatches and accumulate their "
                        "gradients in the step (activation memory / microbatches)")
    p.add_argument("--mesh", default="-1,1", help="data,model mesh shape (-1: the rest)")
    p.add_argument("--fsdp", action="store_true", help="shard the embed axis over data too")
    p.add_argument("--optimizer", default="adafactor", choices=["adafactor", "adamw"])
    p.add_argument("--value_kind", default="separate", choices=["separate", "shared", "scalar"])
    p.add_argument("--peak_tflops", type=float, default=None,
                   help=f"peak for MFU (default {GPU_PEAK_TFLOPS} on GPU; on CPU cores * "
                        f"{CPU_GHZ} GHz * {CPU_FLOP_PER_CYCLE} FLOP/cycle = "
                        f"{cpu_peak_tflops():.3f} here)")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--compile_only", action="store_true",
                   help="compile on abstract shapes only: FLOPs and XLA memory, no timing")
    p.add_argument("--profile_dir", default=None,
                   help=f"after timing, trace {PROFILE_STEPS} steps with jax.profiler into this "
                        "folder (TensorBoard reads it) and add the device time per kernel and per "
                        "category (matmul, attention, fusion, ...) to the record")
    p.add_argument("--no_jaxpr_flops", action="store_true", help="skip the jaxpr dot count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_isolate", action="store_true",
                   help="run several configurations in this process (default: one subprocess "
                        "each, so peak memory is per configuration)")
    p.add_argument("--config_timeout", type=float, default=None,
                   help="seconds per isolated configuration before it is killed and recorded "
                        "as an error")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    p.add_argument("--table", action="store_true", help="print a Markdown table at the end")
    p.add_argument("--anchor", action="store_true",
                   help="print the shell lines that run this benchmark and the PyTorch anchor on the "
                   "same GPU, then the ratios (OUT defaults to reports/gpu), and exit")
    p.add_argument("--compare", default=None, metavar="ANCHOR_JSON",
                   help="anchor output (JSON list or lines): print tokens/s ratios against "
                        "--results (or this invocation's records)")
    p.add_argument("--results", default=None, help="our JSON lines for --compare")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # argparse reads "--mesh -1,1" as a flag -1,1
        if arg == "--mesh" and re.match(r"-\d", argv[i + 1]):
            argv[i:i + 2] = [f"--mesh={argv[i + 1]}"]
            break
    a = p.parse_args(argv)
    _check_args(p, a, network.REMAT_POLICIES)
    return a


def _check_args(p, a, remat_policies) -> None:
    """Bad flags stop here with one line (exit 2), before any compile."""
    lists = {}
    for flag, typ in (("sizes", str), ("algos", str), ("batch", int), ("remat", str), ("scan_unroll", int)):
        try:
            lists[flag] = [typ(x) for x in str(getattr(a, flag)).split(",") if x.strip()]
        except ValueError:
            p.error(f"--{flag}: expected a comma list of {typ.__name__}, got {getattr(a, flag)!r}")
        if not lists[flag]:
            p.error(f"--{flag}: empty list")
    for flag, known in (("sizes", SIZES), ("algos", ALGORITHMS)):
        for name in lists[flag]:
            if name not in known:
                p.error(f"--{flag}: unknown {flag[:-1]} {name!r}; one of {list(known)}")
    if any(u < 1 for u in lists["scan_unroll"]):
        p.error(f"--scan_unroll: layers per iteration must be >= 1, got {a.scan_unroll}")
    if any(u > 1 for u in lists["scan_unroll"]) and not a.scan_layers:
        p.error(f"--scan_unroll {a.scan_unroll} needs --scan_layers (unrolled layers have no scan to unroll)")
    if a.peak_tflops is not None and not a.peak_tflops > 0:
        p.error(f"--peak_tflops must be > 0, got {a.peak_tflops}")
    if a.steps < 1 and not a.compile_only:
        p.error(f"--steps must be >= 1 (timed steps), got {a.steps}")
    if a.warmup < 0:
        p.error(f"--warmup must be >= 0, got {a.warmup}")
    for flag in ("inputs_len", "targets_len", "microbatches"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(a, flag)}")
    for b in _csv(a.batch, int, "--batch"):
        if b < 1:
            p.error(f"--batch must be >= 1, got {b}")
        if b % a.microbatches:
            p.error(f"--batch {b} does not split into --microbatches {a.microbatches}")
    mesh = a.mesh.split(",")
    if len(mesh) != 2 or not all(x.strip().lstrip("-").isdigit() for x in mesh):
        p.error(f"--mesh: expected data,model (e.g. -1,1), got {a.mesh!r}")
    for r in _csv(a.remat):
        if r not in remat_policies:
            p.error(f"--remat: unknown policy {r!r}; one of {list(remat_policies)}")
    for flag in ("compare", "results"):
        path = getattr(a, flag)
        if path and not os.path.isfile(path):
            p.error(f"--{flag}={path}: no such file")
    if a.results and not a.compare:
        p.error("--results is read only with --compare ANCHOR_JSON")
    if a.config_timeout is not None and not a.config_timeout > 0:
        p.error(f"--config_timeout must be > 0 seconds, got {a.config_timeout}")
    if a.out:  # found now, not after the first configuration has compiled and run
        folder = os.path.dirname(os.path.abspath(a.out))
        if os.path.isdir(a.out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            p.error(f"--out={a.out}: not a file in a writable folder")


def configs_from_args(a) -> list[BenchConfig]:
    out = []
    for size, algo, batch, ref, remat, unroll in itertools.product(
            _csv(a.sizes), _csv(a.algos), _csv(a.batch, int, "--batch"),
            _bool_modes(a.precomputed_ref), _csv(a.remat), _csv(a.scan_unroll, int, "--scan_unroll")):
        if algo == "sft" and ref and len(_bool_modes(a.precomputed_ref)) > 1:
            continue  # sft has no reference: one run is enough
        out.append(BenchConfig(
            size=size, algo=algo, batch=batch, inputs_len=a.inputs_len,
            targets_len=a.targets_len, precomputed_ref=ref, dtype=a.dtype, remat=remat,
            attention=a.attention, scan_layers=a.scan_layers, scan_unroll=unroll,
            **_switches(a), microbatches=a.microbatches,
            mesh=a.mesh, fsdp=a.fsdp,
            optimizer=a.optimizer,
            value_kind=a.value_kind, peak_tflops=a.peak_tflops, steps=a.steps,
            warmup=a.warmup, compile_only=a.compile_only, profile_dir=a.profile_dir,
            jaxpr_flops=not a.no_jaxpr_flops,
            seed=a.seed))
    return out


def _child_argv(bc: BenchConfig) -> list[str]:
    argv = ["--sizes", bc.size, "--algos", bc.algo, "--batch", str(bc.batch),
            "--inputs_len", str(bc.inputs_len), "--targets_len", str(bc.targets_len),
            "--precomputed_ref", "true" if bc.precomputed_ref else "false",
            "--dtype", bc.dtype, "--remat", bc.remat, "--attention", bc.attention,
            f"--mesh={bc.mesh}", "--microbatches", str(bc.microbatches),
            "--optimizer", bc.optimizer, "--value_kind", bc.value_kind,
            "--steps", str(bc.steps), "--warmup", str(bc.warmup), "--seed", str(bc.seed)]
    argv += ["--fsdp"] * bc.fsdp + ["--compile_only"] * bc.compile_only
    argv += ["--scan_layers"] * bc.scan_layers + ["--scan_unroll", str(bc.scan_unroll)]
    argv += [f"--{name}" for name, on in _switches(bc).items() if on]
    if bc.profile_dir:
        argv += ["--profile_dir", bc.profile_dir]
    argv += ["--no_jaxpr_flops"] * (not bc.jaxpr_flops)
    if bc.peak_tflops:
        argv += ["--peak_tflops", str(bc.peak_tflops)]
    return argv


def _error_record(bc: BenchConfig, error: str) -> dict:
    """The whole configuration (so a failed row says what it was) and the error, one line."""
    return dict(dataclasses.asdict(bc), xla_flags=os.environ.get("XLA_FLAGS", ""),
                error=error[:300])


def _run_isolated(bc: BenchConfig, timeout_s: float | None = None) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-m", "dro_jax.bench", *_child_argv(bc)],
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return _error_record(bc, f"timed out after {timeout_s} s")
    recs = [r for r in (json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{"))
            if "error" in r or "tokens_per_s" in r]
    if proc.returncode != 0 or not recs:
        return _error_record(bc, (proc.stderr.strip().splitlines() or ["no output"])[-1])
    return recs[0]


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.anchor:
        print(anchor_command(_csv(a.sizes), _csv(a.batch, int)[0], _csv(a.algos)))
        return 0
    records: list[dict] = []
    if a.compare:  # read both before any configuration runs
        try:
            anchor = read_records(a.compare)
            if a.results:
                records = read_records(a.results)
                check_our_records(a.results, records)
        except BenchInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if not (a.compare and a.results):
        configs = configs_from_args(a)
        # A time limit needs a subprocess to kill, even for one configuration.
        isolate = (len(configs) > 1 or a.config_timeout is not None) and not a.no_isolate
        for bc in configs:
            if isolate:
                rec = _run_isolated(bc, a.config_timeout)
            else:
                try:
                    rec = run_config(bc)
                except ValueError as e:  # a configuration that cannot work (mesh, batch split)
                    if len(configs) == 1:
                        print(f"error: {' '.join(str(e).split())[:500]}", file=sys.stderr)
                        return 2
                    rec = _error_record(bc, f"{type(e).__name__}: {e}")
                except Exception as e:  # out of memory etc.: record and go on
                    if len(configs) == 1:
                        raise
                    rec = _error_record(bc, f"{type(e).__name__}: {e}")
            line = json.dumps(rec)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
            records.append(rec)
    rows = None
    if a.compare:
        rows = compare(records, anchor)
        for r in rows:
            print(json.dumps(dict(compare=True, **r)), flush=True)
    if a.table or a.compare:
        print(markdown_table(records, rows))
    if a.compare and not rows:
        print(f"error: no anchor record of {a.compare} matches a timed record here in size, algorithm "
              "(dro/kto) and lengths: no ratio", file=sys.stderr)
        return 1
    if records and all("error" in r for r in records):
        print(f"error: every configuration failed ({len(records)}); see the 'error' fields",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
