#!/usr/bin/env bash
# Issue 7's GPU measurement as one command (about 9 minutes on an H200, then the unrolled
# compile gets what is left: give it timeout_s 580): dro_jax's DRO-V step and the PyTorch
# anchor (shared/bench/hf_t5_anchor.py, copied from ../shared) on the same GPU, then the
# tokens/s ratios. Stages run in order of importance, each under a time limit; a broken stack
# stops at the first (tiny) stage. Results: $OUT (default reports/gpu), traces in $OUT/traces.
#   OUT=reports/gpu bash scripts/gpu_bench.sh
# CPU dry run: ATTN=xla LARGE=tiny XL=tiny BATCH=2 DEV=cpu bash scripts/gpu_bench.sh
set -u
OUT=${OUT:-reports/gpu}
mkdir -p "$OUT"
LARGE=${LARGE:-large}
XL=${XL:-xl}
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

# Measured on an H200 on 2026-11-27 (README): this remat was the fastest large step (41.6% MFU,
# precomputed reference, 32.5 GiB) and no remat the slowest (35.4%, 87.8 GiB).
REMAT=${REMAT:-dots_with_no_batch_dims_saveable}
PROFILE_DIR=${PROFILE_DIR:-/tmp/dro_jax_profile}
stage "dro_jax: $LARGE DRO-V batch $BATCH, cuDNN, remat $REMAT, scanned, precomputed and live, profiled"
bench --sizes "$LARGE" --batch "$BATCH" --attention "$ATTN" --precomputed_ref both --remat "$REMAT" \
  --profile_dir "$PROFILE_DIR"
# The device tool returns files at most a few folders deep: copy each trace up.
mkdir -p "$OUT/traces"
for t in $(find "$PROFILE_DIR" -name perfetto_trace.json.gz 2>/dev/null); do
  cp "$t" "$OUT/traces/$(basename "$(dirname "$(dirname "$(dirname "$(dirname "$t")")")")").json.gz"
done

if ! grep -q '"tokens_per_s": [0-9]' "$RESULTS" 2>/dev/null; then
  stage "cuDNN failed: the same with XLA attention"
  bench --sizes "$LARGE" --batch "$BATCH" --attention xla --precomputed_ref true --remat "$REMAT"
fi

# Under that remat the backward runs cuDNN's attention forward again (about 12 of the 55 ms of
# attention a step); this policy also saves the forward's outputs.
stage "dro_jax: $LARGE DRO-V batch $BATCH, remat dots_with_no_batch_dims_and_attention_saveable"
bench --sizes "$LARGE" --batch "$BATCH" --attention "$ATTN" --precomputed_ref both \
  --remat dots_with_no_batch_dims_and_attention_saveable

stage "anchor: HF T5 PyTorch eager bf16 (PLAN=${ANCHOR_PLAN:-$LARGE:$BATCH,$LARGE:$HALF})"
PLAN=${ANCHOR_PLAN:-$LARGE:$BATCH,$LARGE:$HALF} OUT="$OUT" timeout 240 $PY "$ANCHOR" | tee "$OUT/anchor.jsonl"

stage "ratios (large)"
$PY -m dro_jax.bench --compare "$OUT/anchor.jsonl" --results "$RESULTS" | tee "$OUT/compare.txt"

# One wider matmul in place of q/k/v (and cross k/v, wi_0/wi_1): the matmuls were 120 of the
# 322 ms of the profiled no-remat step.
stage "dro_jax: $LARGE DRO-V batch $BATCH, remat dots_with_no_batch_dims_and_attention_saveable, fused projections"
bench --sizes "$LARGE" --batch "$BATCH" --attention "$ATTN" --precomputed_ref both \
  --remat dots_with_no_batch_dims_and_attention_saveable --fused_projections

# 54.3% MFU at 79.9 GiB on 2026-11-27; with --microbatches 2, 48.1% at 69.0 GiB.
XL_ARGS=${XL_ARGS:---remat dots_with_no_batch_dims_saveable}
stage "dro_jax: $XL DRO-V batch $BATCH, cuDNN, scanned, precomputed, $XL_ARGS"
bench --sizes "$XL" --batch "$BATCH" --attention "$ATTN" --precomputed_ref true $XL_ARGS

# Scanning costs step time: the scanned base step ran at 30.6% MFU, the unrolled one at 38.1%
# (another session); in the large profile a quarter of the step was the scan's stacked-buffer
# writes (dynamic-update-slice), their zero-fill and copies. Ways to win it back, cheapest first:
# fewer loop iterations; letting XLA write the saved matmul outputs straight into the stacked
# buffers (dynamic-slice fusion); no CUDA graphs; and, last, no loop at all.
stage "dro_jax: $LARGE DRO-V batch $BATCH, remat $REMAT, scan unrolled 4 layers per iteration"
bench --sizes "$LARGE" --batch "$BATCH" --attention "$ATTN" --precomputed_ref true --remat "$REMAT" \
  --scan_unroll 4
# The profile's copies (24 ms a step) run inside CUDA graphs (command buffers) in the loop bodies.
for FLAG in --xla_gpu_enable_dynamic_slice_fusion=true --xla_gpu_enable_command_buffer=; do
  stage "dro_jax: $LARGE DRO-V batch $BATCH, remat $REMAT, scanned, XLA_FLAGS $FLAG (record: xla_flags)"
  XLA_FLAGS="${XLA_FLAGS:-} $FLAG" bench --sizes "$LARGE" --batch "$BATCH" --attention "$ATTN" \
    --precomputed_ref true --remat "$REMAT"
done
# Last: its compile may take the rest of the time (what ran before is already in $OUT). If it
# runs out, run this stage alone in a second call.
stage "dro_jax: $LARGE DRO-V batch $BATCH, remat $REMAT, unrolled layers (long compile)"
$PY -m dro_jax.bench --algos dro_v --inputs_len 512 --targets_len 256 --no_jaxpr_flops \
  --config_timeout "${UNROLLED_TIMEOUT:-300}" --out "$RESULTS" --sizes "$LARGE" --batch "$BATCH" \
  --attention "$ATTN" --precomputed_ref true --remat "$REMAT" --steps 3 --warmup 1

stage "ratios"
$PY -m dro_jax.bench --compare "$OUT/anchor.jsonl" --results "$RESULTS" | tee "$OUT/compare.txt"
stage done
