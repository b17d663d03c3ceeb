#!/usr/bin/env bash
# Issue 7's GPU measurement as one command (about 9 minutes on an H200): dro_jax's DRO-V step
# and the PyTorch anchor (shared/bench/hf_t5_anchor.py, copied from ../shared) on the same GPU,
# then the tokens/s ratios. Stages run in order of importance, each under a time limit; a
# broken stack stops at the first (tiny) stage. Results: $OUT (default reports/gpu).
#   OUT=reports/gpu bash scripts/gpu_bench.sh
# CPU dry run: ATTN=xla LARGE=tiny XL=tiny BATCH=2 DEV=cpu bash scripts/gpu_bench.sh
set -u
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
LARGE=${LARGE:-large}
XL=${XL:-xl}
BASE=${BASE:-base}
BATCH=${BATCH:-32}
HALF=$((BATCH / 2))
ANCHOR=${ANCHOR:-$(ls shared/bench/hf_t5_anchor.py ../shared/bench/hf_t5_anchor.py 2>/dev/null | head -1)}
ATTN=${ATTN:-cudnn}
CONFIG_TIMEOUT=${CONFIG_TIMEOUT:-200}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
RESULTS="$OUT/dro_jax.jsonl"
stage() { echo "== $(date +%T) $*"; }
# Layers run under nn.scan: the unrolled T5-large step did not compile within 170 s on an H200.
bench() {
  $PY -m dro_jax.bench --algos dro_v --inputs_len 512 --targets_len 256 --no_jaxpr_flops \
    --scan_layers --config_timeout "$CONFIG_TIMEOUT" --out "$RESULTS" "$@"
}

stage device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt"
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/device.txt" || exit 1

stage "smoke: tiny DRO-V step with cuDNN attention (stops here if the stack is broken)"
$PY -m dro_jax.bench --sizes tiny --batch 8 --attention "$ATTN" --steps 2 --warmup 1 --no_jaxpr_flops \
  --scan_layers || exit 1

stage "dro_jax: $LARGE DRO-V batch $BATCH, cuDNN, no remat, scanned layers, precomputed and live reference"
bench --sizes "$LARGE" --batch "$BATCH" --attention "$ATTN" --precomputed_ref both --remat none \
  --profile_dir "${PROFILE_DIR:-/tmp/dro_jax_profile}"
if ! grep -q '"tokens_per_s": [0-9]' "$RESULTS" 2>/dev/null; then
  stage "cuDNN failed: the same with XLA attention"
  bench --sizes "$LARGE" --batch "$BATCH" --attention xla --precomputed_ref true --remat none
fi

stage "anchor: HF T5 PyTorch eager bf16 (PLAN=${ANCHOR_PLAN:-$LARGE:$BATCH,$LARGE:$HALF,$BASE:$BATCH})"
PLAN=${ANCHOR_PLAN:-$LARGE:$BATCH,$LARGE:$HALF,$BASE:$BATCH} OUT="$OUT" timeout 240 $PY "$ANCHOR" | tee "$OUT/anchor.jsonl"

stage "ratios (large)"
$PY -m dro_jax.bench --compare "$OUT/anchor.jsonl" --results "$RESULTS" | tee "$OUT/compare.txt"

# XL within 80 GiB: 33 GB of float32 params and gradients before any activation. XLA's CPU memory
# analysis (README) gives 127 GiB for this remat at batch 32 and 97 with 2 microbatches; the GPU
# needs far less, and the record's peak_mem_gib says how much.
XL_ARGS=${XL_ARGS:---remat dots_with_no_batch_dims_saveable --microbatches 2}
stage "dro_jax: $XL DRO-V batch $BATCH, cuDNN, scanned, precomputed, $XL_ARGS"
bench --sizes "$XL" --batch "$BATCH" --attention "$ATTN" --precomputed_ref true $XL_ARGS

stage "dro_jax: $LARGE DRO-V batch $HALF, live reference (the anchor's DRO-V fits at this batch)"
bench --sizes "$LARGE" --batch "$HALF" --attention "$ATTN" --precomputed_ref false --remat none

stage "dro_jax: $BASE DRO-V batch $BATCH, live reference, scanned (unrolled on 2026-11-27: 227,351 tokens/s)"
bench --sizes "$BASE" --batch "$BATCH" --attention "$ATTN" --precomputed_ref false --remat none

# Passed on an H200 on 2026-11-27, so it runs last.
stage "cuDNN attention == XLA attention (DRO-V loss and gradients)"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} JAX_PLATFORMS=${JAX_PLATFORMS:-} timeout 150 \
  $PY -m pytest -q -p no:cacheprovider tests/test_gpu_attention.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"

stage "ratios"
$PY -m dro_jax.bench --compare "$OUT/anchor.jsonl" --results "$RESULTS" | tee "$OUT/compare.txt"
stage done
