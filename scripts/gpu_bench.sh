#!/usr/bin/env bash
# Issue 7's GPU measurement: dro_jax's DRO-V step and the PyTorch anchor
# (shared/bench/hf_t5_anchor.py, copied from ../shared) on the same GPU, then the tokens/s
# ratios. Parts sized for one device-tool call each (timeout_s 595):
#   bash scripts/gpu_bench.sh core      # large steps (live reference), the anchor, the ratios
#   bash scripts/gpu_bench.sh extra     # precomputed reference, XL, scan variants, XLA flags, GPU tests
#   bash scripts/gpu_bench.sh unrolled  # the unrolled large step (long compile)
#   bash scripts/gpu_bench.sh lease     # one call for a 15-minute device budget: baseline and anchor,
#                                       # where JAX decides the bias gradient, GPU tests, frozen bias, XL
#   bash scripts/gpu_bench.sh           # all three in order
# Each stage has a time limit; a broken stack stops at the first stage (core: a tiny step; lease:
# its baseline). Results: $OUT (default reports/gpu): dro_jax.jsonl, anchor.jsonl,
# anchor_hf_t5.json, compare.txt, notes.txt (device, GPU tests, where JAX decides the bias
# gradient), traces/. The device tool returns at most 8 files: part lease writes 6, core 7, so a
# caller's `| tee $OUT/log.txt` still comes back.
# The anchor must be in the checkout (shared/bench/hf_t5_anchor.py): the ../shared beside it
# does not travel to the device machine.
# CPU dry run: ATTN=xla LARGE=tiny XL=tiny BATCH=2 bash scripts/gpu_bench.sh
set -u -o pipefail
[ $# -le 1 ] || { echo "usage: $0 [core|extra|unrolled|lease|all] (one part)" >&2; exit 2; }
PARTS=${1:-all}
case "$PARTS" in core|extra|unrolled|lease|all) ;; *) echo "usage: $0 [core|extra|unrolled|lease|all]" >&2; exit 2;; esac
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
LARGE=${LARGE:-large}
XL=${XL:-xl}
BATCH=${BATCH:-32}
HALF=$((BATCH / 2))
ANCHOR=${ANCHOR:-$(ls shared/bench/hf_t5_anchor.py ../shared/bench/hf_t5_anchor.py 2>/dev/null | head -1)}
NOTES="$OUT/notes.txt"
ATTN=${ATTN:-cudnn}
CONFIG_TIMEOUT=${CONFIG_TIMEOUT:-200}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
RESULTS="$OUT/dro_jax.jsonl"
# Measured on an H200 on 2026-11-27 (README): the fastest large step so far (41.6% MFU with a
# precomputed reference, 43.3% live, 32.5 GiB); no remat was the slowest (35.4%, 87.8 GiB).
REMAT=${REMAT:-dots_with_no_batch_dims_saveable}
# The same plus cuDNN attention's forward outputs: under REMAT the backward reruns that forward
# (about 12 of the 55 ms of attention a step).
REMAT_ATTN=dots_with_no_batch_dims_and_attention_saveable
# A fresh folder: copy_traces copies every trace in it, and a warm machine keeps /tmp.
PROFILE_DIR=${PROFILE_DIR:-$(mktemp -d /tmp/dro_jax_profile.XXXXXX)}
stage() { echo "== $(date +%T) $*"; }
want() { [ "$PARTS" = all ] || [ "$PARTS" = "$1" ]; }
# Part lease starts no stage after LEASE_S seconds, and gives each configuration at most the time
# left before LEASE_END_S, so the call ends inside the device tool's limit (timeout_s 595).
LEASE_S=${LEASE_S:-470}
LEASE_END_S=${LEASE_END_S:-560}
in_time() { [ "$SECONDS" -lt "$LEASE_S" ] || { stage "skipped (over ${LEASE_S}s): $*"; return 1; }; }
# The per-configuration limit: CONFIG_TIMEOUT, or in part lease the time left divided by $1 configurations.
config_timeout() {
  local n=${1:-1} left
  [ "$PARTS" = lease ] || { echo "$CONFIG_TIMEOUT"; return; }
  left=$(( (LEASE_END_S - SECONDS) / n ))
  [ "$left" -lt 30 ] && left=30
  [ "$left" -lt "$CONFIG_TIMEOUT" ] && echo "$left" || echo "$CONFIG_TIMEOUT"
}
# Layers run under nn.scan: the unrolled T5-large step did not compile within 170 s on an H200.
# CONFIGS: how many configurations the call runs (they share part lease's time left).
bench() {
  $PY -m dro_jax.bench --algos dro_v --inputs_len 512 --targets_len 256 --no_jaxpr_flops \
    --scan_layers --config_timeout "$(config_timeout "${CONFIGS:-1}")" --out "$RESULTS" "$@"
}
anchor() {  # $1: the anchor's PLAN, $2: its time limit
  if [ -z "$ANCHOR" ] || [ ! -f "$ANCHOR" ]; then
    stage "anchor: NOT FOUND (copy ../shared/bench/hf_t5_anchor.py to shared/bench/ in the checkout; no ratios)"
    rm -f "$OUT/anchor.jsonl"  # an earlier run's would give ratios against another machine
    return 1
  fi
  PLAN=$1 OUT="$OUT" timeout "$2" $PY "$ANCHOR" | tee "$OUT/anchor.jsonl"
}
large() { bench --sizes "$LARGE" --batch "$BATCH" --attention "$ATTN" "$@"; }
# A later part run in a fresh $OUT has no anchor file: compare afterwards with --compare.
ratios() {
  [ -s "$OUT/anchor.jsonl" ] || { stage "ratios: no $OUT/anchor.jsonl (part core writes it)"; return; }
  stage "ratios"
  $PY -m dro_jax.bench --compare "$OUT/anchor.jsonl" --results "$RESULTS" | tee "$OUT/compare.txt"
}

# The device tool returns files at most a few folders deep: copy each trace up.
copy_traces() {
  mkdir -p "$OUT/traces"
  for t in $(find "$PROFILE_DIR" -name perfetto_trace.json.gz 2>/dev/null); do
    cp "$t" "$OUT/traces/$(basename "$(dirname "$(dirname "$(dirname "$(dirname "$t")")")")").json.gz"
  done
}

# Where this JAX decides cuDNN attention's bias gradient, and what the frozen-bias hook in
# network.py wraps (jax 0.11.2 removed should_export_dbias, which the hook first patched).
dbias_source() {
  echo "== where JAX decides the bias gradient" >>"$NOTES"
  timeout 60 $PY - <<'PYEOF' 2>&1 | tee -a "$NOTES"
import inspect, jax
from jax._src.nn import functions as f
from dro_jax import network
callee = inspect.unwrap(f.cudnn_dot_product_attention)
path = inspect.getsourcefile(callee)
print("jax", jax.__version__, "callee", callee.__module__, path)
target = (network._cudnn_attention_globals() or {}).get("_dot_product_attention")
print("hook target _dot_product_attention", inspect.signature(target) if target else None)
for i, line in enumerate(open(path), 1):
  if "dbias" in line and ("=" in line or "def " in line):
    print(f"{i}: {line.rstrip()}")
PYEOF
}

stage "device (parts: $PARTS)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee -a "$NOTES"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$NOTES" || exit 1
GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1 || true)

if want core; then
  stage "smoke: tiny DRO-V step with cuDNN attention (stops here if the stack is broken)"
  timeout 240 $PY -m dro_jax.bench --sizes tiny --batch 8 --attention "$ATTN" --steps 2 --warmup 1 --no_jaxpr_flops \
    --scan_layers || exit 1

  stage "$LARGE DRO-V batch $BATCH, remat $REMAT, live reference, profiled (this lease's baseline)"
  large --precomputed_ref false --remat "$REMAT" --profile_dir "$PROFILE_DIR"
  copy_traces
  if ! tail -n 1 "$RESULTS" 2>/dev/null | grep -q '"tokens_per_s": [0-9]'; then
    stage "cuDNN failed: the same with XLA attention"
    bench --sizes "$LARGE" --batch "$BATCH" --attention xla --precomputed_ref true --remat "$REMAT"
  fi

  # Early, since every ratio needs it. Its DRO-V large step ran out of memory at batch 32 on
  # the 140 GiB H200 on 2026-11-27, so by default it runs batch 16 only (--compare then uses
  # it); ANCHOR_PLAN=large:32,large:16 checks 32 again.
  stage "anchor: HF T5 PyTorch eager bf16 (PLAN=${ANCHOR_PLAN:-$LARGE:$HALF})"
  anchor "${ANCHOR_PLAN:-$LARGE:$HALF}" 240

  stage "$LARGE DRO-V batch $BATCH, remat $REMAT_ATTN, live reference"
  large --precomputed_ref false --remat "$REMAT_ATTN"
  # One wider matmul for q/k/v, cross k/v and wi_0/wi_1 (matmuls: 120 of 322 ms in the
  # no-remat profile).
  stage "$LARGE DRO-V batch $BATCH, remat $REMAT_ATTN, fused projections, live reference"
  large --precomputed_ref false --remat "$REMAT_ATTN" --fused_projections
  # cuDNN's backward also computes the bias gradient, a reduction over the batch (attention was
  # 55 ms a step, about 123 TFLOP/s); a frozen bias needs none. This changes training (the
  # 32 x 16 relative-position numbers of each stack stay fixed), so its rows are labelled.
  stage "$LARGE DRO-V batch $BATCH, remat $REMAT_ATTN, fused, frozen bias, live reference, profiled"
  large --precomputed_ref false --remat "$REMAT_ATTN" --fused_projections \
    --freeze_relative_attention_bias --profile_dir "$PROFILE_DIR"
  copy_traces
  ratios
fi

if want extra; then
  # The precomputed-reference step (the highest tokens/s last time) of core's variants.
  stage "$LARGE DRO-V batch $BATCH, remat $REMAT_ATTN, precomputed reference: plain, fused, fused + frozen bias"
  large --precomputed_ref true --remat "$REMAT_ATTN"
  large --precomputed_ref true --remat "$REMAT_ATTN" --fused_projections
  large --precomputed_ref true --remat "$REMAT_ATTN" --fused_projections --freeze_relative_attention_bias

  # They check the cuDNN paths the variants above rely on (frozen bias, attention remat).
  # tests/conftest.py hides GPUs unless CUDA_VISIBLE_DEVICES and JAX_PLATFORMS say otherwise.
  dbias_source
  stage "GPU tests: cuDNN attention with T5's bias, and the $REMAT_ATTN remat"
  CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda timeout 200 $PY -m pytest -q -rs tests/test_gpu_attention.py 2>&1 | tail -15 | { echo "== GPU tests"; cat; } | tee -a "$NOTES"

  # Scanning costs step time: the scanned base step ran at 30.6% MFU, the unrolled one at 38.1%
  # (another lease); in the large profile a quarter of the step was the scan's stacked-buffer
  # writes (dynamic-update-slice), their zero-fill and copies. Ways to win it back: fewer loop
  # iterations; letting XLA write the saved matmul outputs straight into the stacked buffers
  # (dynamic-slice fusion); no CUDA graphs (the copies ran inside them); no loop (part unrolled).
  stage "$LARGE DRO-V batch $BATCH, remat $REMAT_ATTN, scan unrolled 4 layers per iteration"
  large --precomputed_ref true --remat "$REMAT_ATTN" --scan_unroll 4
  for FLAG in --xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_command_buffer=; do
    stage "$LARGE DRO-V batch $BATCH, remat $REMAT_ATTN, XLA_FLAGS $FLAG (record: xla_flags)"
    XLA_FLAGS="${XLA_FLAGS:-} $FLAG" large --precomputed_ref true --remat "$REMAT_ATTN"
  done
  # 54.3% MFU at 79.9 GiB on an H200 on 2026-11-27; with --microbatches 2, 48.1% at 69.0 GiB.
  # Under 100 GiB of device memory (an H100) it needs the microbatches.
  if [ -z "${XL_ARGS:-}" ]; then
    XL_ARGS="--remat $REMAT"
    if [[ "$GPU_MIB" =~ ^[0-9]+$ ]] && [ "$GPU_MIB" -lt 102400 ]; then
      XL_ARGS="$XL_ARGS --microbatches 2"
    fi
  fi
  stage "$XL DRO-V batch $BATCH, precomputed, $XL_ARGS"
  bench --sizes "$XL" --batch "$BATCH" --attention "$ATTN" --precomputed_ref true $XL_ARGS

  ratios
fi

if want unrolled; then
  stage "$LARGE DRO-V batch $BATCH, remat $REMAT_ATTN, unrolled layers (long compile)"
  $PY -m dro_jax.bench --algos dro_v --inputs_len 512 --targets_len 256 --no_jaxpr_flops \
    --config_timeout "${UNROLLED_TIMEOUT:-400}" --out "$RESULTS" --sizes "$LARGE" --batch "$BATCH" \
    --attention "$ATTN" --precomputed_ref true --remat "$REMAT_ATTN" --steps 3 --warmup 1
  ratios
fi
# One device call of about 8 minutes (each large configuration takes about 40 s, compile
# included). Stages in order of what they decide: this run's baseline and the anchor first.
# Measured on 2026-11-27 (README, run C): fused projections, scan unroll 2, dynamic-slice
# fusion and no CUDA graphs were all slower. Run D (2026-11-28, this part at 0d8f809): the fixed
# frozen-bias hook gave 45.3% against 43.7%; casting kernels once +0.1 MFU points (noise); the eight GPU
# tests need about 210 s (the 170 s cap cut the last).
if [ "$PARTS" = lease ]; then
  # Profiled: the trace shows whether the vocabulary projection's TF32 GEMMs (3.7 ms in run C')
  # are gone (losses.vocab_logits) and what the copies and broadcasts are now.
  stage "$LARGE DRO-V batch $BATCH, remat $REMAT_ATTN, live reference, profiled (this run's baseline)"
  large --precomputed_ref false --remat "$REMAT_ATTN" --profile_dir "$PROFILE_DIR"
  copy_traces
  if ! tail -n 1 "$RESULTS" 2>/dev/null | grep -q '"tokens_per_s": [0-9]' && [ "$ATTN" != xla ]; then
    # A broken cuDNN path must not cost the lease its anchor: XLA attention from here on.
    ATTN=xla
    stage "baseline with cuDNN attention failed: the same with XLA attention, and XLA from here on"
    large --precomputed_ref false --remat "$REMAT_ATTN"
  fi
  tail -n 1 "$RESULTS" 2>/dev/null | grep -q '"tokens_per_s": [0-9]' || { stage "baseline failed"; exit 1; }
  stage "anchor: HF T5 PyTorch eager bf16 (PLAN=$LARGE:$HALF)"
  anchor "$LARGE:$HALF" 120
  # Kernels cast to bf16 once before the layer loop: bf16 kernel gradients in the backward loop
  # (its f32 stacked buffers, their zero-fill and DUS are half the bytes); 0.6 GiB more on the H200 (run D).
  in_time "cast once" && { stage "remat $REMAT_ATTN, kernels cast before the scan, live reference"
    large --precomputed_ref false --remat "$REMAT_ATTN" --cast_kernels_before_scan; }
  stage "where this JAX decides the bias gradient"
  dbias_source
  in_time "GPU tests" && { stage "GPU tests (the frozen-bias one checks the hook)"
    CUDA_VISIBLE_DEVICES=0 JAX_PLATFORMS=cuda timeout "$(t=$(config_timeout); echo $((t < 240 ? t : 240)))" $PY -m pytest -q -rs tests/test_gpu_attention.py 2>&1 | tail -15 | { echo "== GPU tests"; cat; } | tee -a "$NOTES"; }
  in_time "frozen bias" && { stage "remat $REMAT_ATTN, frozen bias, live and precomputed"
    CONFIGS=2 large --precomputed_ref both --remat "$REMAT_ATTN" --freeze_relative_attention_bias; }
  in_time "precomputed" && { stage "remat $REMAT_ATTN, precomputed"
    large --precomputed_ref true --remat "$REMAT_ATTN"; }
  # Run D (2026-11-28): $REMAT_ATTN took XL to 84.3 GiB (55.6%), $REMAT 79.9 GiB (54.4%).
  in_time "XL" && { stage "$XL DRO-V batch $BATCH, precomputed, remat $REMAT (memory against 80 GiB)"
    bench --sizes "$XL" --batch "$BATCH" --attention "$ATTN" --precomputed_ref true --remat "$REMAT"; }
  ratios
fi
stage done
