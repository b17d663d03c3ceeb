"""T5 (v1.0 and v1.1 / Flan-T5) encoder-decoder and value networks in Flax linen.

Every parameter carries t5x logical axis names (via `nn.with_logical_partitioning`)
and the main activations carry `nn.with_logical_constraint`s, so `sharding.py` can
map them onto a mesh with logical-axis rules.

Parameter tree of `T5` (the unboxed 'params' collection; D=d_model, H=num_heads,
K=d_kv, F=d_ff, V=vocab_size, R=relative_attention_num_buckets):

    token_embedder/embedding                         [V, D]     (vocab, embed)
    encoder/relpos_bias/rel_embedding                [R, H]     (relpos_buckets, heads)
    encoder/layers_{i}/pre_attention_layer_norm/scale  [D]      (embed,)
    encoder/layers_{i}/attention/{query,key,value}/kernel [D, H, K] (embed, heads, kv)
    encoder/layers_{i}/attention/out/kernel          [H, K, D]  (heads, kv, embed)
    encoder/layers_{i}/pre_mlp_layer_norm/scale      [D]
    encoder/layers_{i}/mlp/wi/kernel                 [D, F]     (embed, mlp)   relu
    encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel        [D, F]     (embed, mlp)   gated-gelu
    encoder/layers_{i}/mlp/wo/kernel                 [F, D]     (mlp, embed)
    encoder/encoder_norm/scale                       [D]
    decoder/relpos_bias/rel_embedding                [R, H]
    decoder/layers_{i}/pre_self_attention_layer_norm/scale
    decoder/layers_{i}/self_attention/{query,key,value,out}/kernel
    decoder/layers_{i}/pre_cross_attention_layer_norm/scale
    decoder/layers_{i}/encoder_decoder_attention/{query,key,value,out}/kernel
    decoder/layers_{i}/pre_mlp_layer_norm/scale
    decoder/layers_{i}/mlp/...                       (as in the encoder)
    decoder/decoder_norm/scale                       [D]
    lm_head/kernel                                   [D, V]     (embed, vocab)  untied only

The KV cache ('cache' collection, `decode=True`) holds, per decoder layer,
`self_attention/{cached_key,cached_value}` [B, L, H, K] and
`encoder_decoder_attention/{cached_key,cached_value}` [B, S, H, K] (projected once),
plus `decoder/position` (int32 scalar, the next position to write).

With T5Config(scan_layers=True) the layers run under nn.scan: `layers_{i}/...` becomes one
`layers/...` subtree whose arrays have a leading [num_layers] axis (logical name 'layers');
`stack_layers` / `unstack_layers` convert between the two layouts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array

_DTYPES = ("float32", "bfloat16", "float16")
_FF_PROJ = ("relu", "gated-gelu")
_ATTENTION_IMPLS = ("xla", "cudnn")
REMAT_POLICIES = (
    "none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable",
    "dots_with_no_batch_dims_and_attention_saveable", "nothing_saveable", "everything_saveable",
)


def dots_with_no_batch_dims_and_attention_saveable(prim, *args, **params) -> bool:
  """Remat policy: the projections' outputs, as `dots_with_no_batch_dims_saveable`, plus the
  outputs of cuDNN's fused attention forward (the attention output and its softmax
  statistics), which its backward needs; without them the backward runs the forward again.
  On the XLA attention path it saves the same as `dots_with_no_batch_dims_saveable`."""
  if prim.name.startswith("dot_product_attention_fwd"):
    return True
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


def _remat_policy(name: str):
  if name == "full":
    return None
  if name == "dots_with_no_batch_dims_and_attention_saveable":
    return dots_with_no_batch_dims_and_attention_saveable
  return getattr(jax.checkpoint_policies, name)


# Additive mask value: large but finite so fully-masked rows give a uniform softmax, not NaN.
_MASK_VALUE = -1e10


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5 model. Defaults: T5 v1.1, small-ish."""
  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 1024
  num_heads: int = 6
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "gated-gelu"   # "gated-gelu" (v1.1) or "relu" (v1.0)
  tie_word_embeddings: bool = False       # True (v1.0): logits = (x * d_model**-0.5) @ E^T
  dtype: str = "float32"                  # compute dtype; params are always float32
  remat_policy: str = "none"              # see REMAT_POLICIES
  attention_impl: str = "xla"             # "xla" or "cudnn" (GPU only, bf16/fp16)
  scan_layers: bool = False               # nn.scan over layers: params stacked under 'layers'
  scan_unroll: int = 1                    # with scan_layers: layers per loop iteration
  fused_projections: bool = False         # one matmul for q/k/v, for cross k/v, for wi_0/wi_1
  freeze_relative_attention_bias: bool = False  # no gradient or update for the rel_embedding tables
  cast_kernels_before_scan: bool = False  # with scan_layers: kernels cast to dtype once, not per layer
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                 "num_decoder_layers", "relative_attention_num_buckets",
                 "relative_attention_max_distance"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
    if self.relative_attention_num_buckets < 4:
      raise ValueError("T5Config.relative_attention_num_buckets must be >= 4, got "
                       f"{self.relative_attention_num_buckets}")
    for name, ok in (("dropout_rate", lambda x: 0.0 <= x < 1.0), ("layer_norm_epsilon", lambda x: x > 0)):
      value = getattr(self, name)  # gin passes None or a string on as given
      if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not ok(value):
        raise ValueError(f"T5Config.{name} must be a number "
                         f"{'in [0, 1)' if name == 'dropout_rate' else '> 0'}, got {value!r}")
    if self.feed_forward_proj not in _FF_PROJ:
      raise ValueError(f"T5Config.feed_forward_proj must be one of {_FF_PROJ}, got "
                       f"{self.feed_forward_proj!r}")
    if not isinstance(self.tie_word_embeddings, (bool, np.bool_)):
      raise ValueError("T5Config.tie_word_embeddings must be a bool, got "
                       f"{self.tie_word_embeddings!r}")
    if self.dtype not in _DTYPES:
      raise ValueError(f"T5Config.dtype must be one of {_DTYPES}, got {self.dtype!r}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"T5Config.remat_policy must be one of {REMAT_POLICIES}, got "
                       f"{self.remat_policy!r}")
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f"T5Config.attention_impl must be one of {_ATTENTION_IMPLS}, got "
                       f"{self.attention_impl!r}")
    for name in ("scan_layers", "fused_projections", "freeze_relative_attention_bias",
                 "cast_kernels_before_scan"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"T5Config.{name} must be a bool, got {getattr(self, name)!r}")
    if (isinstance(self.scan_unroll, bool) or not isinstance(self.scan_unroll, (int, np.integer))
        or self.scan_unroll < 1):
      raise ValueError(f"T5Config.scan_unroll must be a positive int, got {self.scan_unroll!r}")
    if self.cast_kernels_before_scan and not self.scan_layers:
      raise ValueError("T5Config.cast_kernels_before_scan needs scan_layers=True (it casts the "
                       "stacked kernels before the layer scan)")
    if self.attention_impl == "cudnn" and self.dtype == "float32":
      raise ValueError("T5Config.attention_impl='cudnn' needs dtype bfloat16 or float16")
    for name in ("pad_id", "eos_id", "decoder_start_id"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or not 0 <= value < self.vocab_size:
        raise ValueError(f"T5Config.{name} must be an int in [0, vocab_size={self.vocab_size}), "
                         f"got {value!r}")

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable dict of all fields."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "T5Config":
    """Inverse of `to_dict`; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"T5Config: unknown field(s) {', '.join(unknown)}")
    return cls(**d)

  def replace(self, **changes) -> "T5Config":
    return dataclasses.replace(self, **changes)

  # How the network is computed and trained, not the function it computes: a checkpoint loads
  # into a config that differs from its own only in these (scan_layers: the layout is converted).
  RUNTIME_FIELDS = frozenset({"dtype", "remat_policy", "attention_impl", "dropout_rate",
                              "scan_layers", "scan_unroll", "fused_projections",
                              "freeze_relative_attention_bias", "cast_kernels_before_scan"})

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


# ----------------------------------------------------------------------------- helpers


def _constrain(x: Array, axes: tuple) -> Array:
  return nn.with_logical_constraint(x, axes)


def _variance_scaling(scale, in_axis, out_axis, mode="fan_in", distribution="truncated_normal"):
  return nn.initializers.variance_scaling(scale, mode, distribution, in_axis=in_axis,
                                          out_axis=out_axis)


@functools.lru_cache(maxsize=None)
def _bucket_table(bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket of every relative position in [-max_distance, max_distance] (int32 numpy).

  Computed in float64 with a tiny epsilon so exact bucket boundaries (e.g. distance 16,
  32, 64 for 32 buckets) land in the mathematically correct bucket, as in T5/HF.
  Positions beyond +-max_distance saturate, so the caller clips into this range.
  """
  rel = np.arange(-max_distance, max_distance + 1, dtype=np.int64)  # key - query
  buckets = np.zeros_like(rel)
  n = num_buckets
  if bidirectional:
    n //= 2
    buckets += (rel > 0).astype(np.int64) * n
    dist = np.abs(rel)
  else:
    dist = np.maximum(-rel, 0)
  max_exact = n // 2
  with np.errstate(divide="ignore"):
    large = max_exact + np.floor(
        np.log(np.maximum(dist, 1) / max_exact) / math.log(max_distance / max_exact)
        * (n - max_exact) + 1e-6).astype(np.int64)
  large = np.minimum(large, n - 1)
  buckets += np.where(dist < max_exact, dist, large)
  return buckets.astype(np.int32)


def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
  """T5's log-spaced bucket of `relative_position` (= key_pos - query_pos), int32."""
  table = jnp.asarray(_bucket_table(bidirectional, num_buckets, max_distance))
  idx = jnp.clip(relative_position, -max_distance, max_distance) + max_distance
  return table[idx]


# ----------------------------------------------------------------------------- layers


class Dense(nn.Module):
  """Contracts the last `len(in_shape)` dims of x with a float32 kernel of shape in+out."""
  in_shape: tuple
  out_shape: tuple
  axes: tuple
  kernel_init: Callable
  dtype: Any = jnp.float32

  def setup(self):
    shape = tuple(self.in_shape) + tuple(self.out_shape)
    self.kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                             shape, jnp.float32)

  def cast_kernel(self) -> Array:
    return self.kernel.astype(self.dtype)

  def __call__(self, x: Array) -> Array:
    return _contract(x, self.cast_kernel(), len(self.in_shape))


def _contract(x: Array, kernel: Array, n_in: int) -> Array:
  """x [..., *in] with kernel [*in, *out] -> [..., *out], in the kernel's dtype."""
  contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  return jax.lax.dot_general(x.astype(kernel.dtype), kernel, (contract, ((), ())))


def fused_dense(x: Array, projections: Sequence[Dense]) -> list[Array]:
  """`[p(x) for p in projections]` as one matmul (wider, so faster on GPUs): the kernels,
  all of the same shape, are stacked on a new axis after their input dims. The parameters
  stay separate, so checkpoints do not change."""
  n_in = len(projections[0].in_shape)
  kernel = jnp.stack([p.cast_kernel() for p in projections], axis=n_in)
  out = _contract(x, kernel, n_in)  # [..., n, *out]
  axis = x.ndim - n_in
  return [jax.lax.index_in_dim(out, i, axis, keepdims=False) for i in range(len(projections))]


class RMSNorm(nn.Module):
  """T5 layer norm: no mean subtraction, no bias; statistics in float32."""
  epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale).astype(self.dtype)


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` is the tied output projection."""
  config: T5Config

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    """[B, L] int -> [B, L, D] compute dtype."""
    return jnp.take(self.embedding, tokens, axis=0).astype(self.config.compute_dtype)

  def attend(self, x: Array) -> Array:
    """[B, L, D] -> [B, L, V]."""
    dt = self.config.compute_dtype
    return jnp.einsum("bld,vd->blv", x.astype(dt), self.embedding.astype(dt))


class RelativePositionBias(nn.Module):
  """Shared per-stack bias: [1, H, T, S] from query positions [T] and key positions [S]."""
  config: T5Config
  bidirectional: bool

  @nn.compact
  def __call__(self, q_pos: Array, k_pos: Array) -> Array:
    cfg = self.config
    table = self.param(
        "rel_embedding",
        nn.with_logical_partitioning(_variance_scaling(1.0, 0, 1, "fan_avg", "uniform"),
                                     ("relpos_buckets", "heads")),
        (cfg.relative_attention_num_buckets, cfg.num_heads), jnp.float32)
    buckets = relative_position_bucket(
        k_pos[None, :] - q_pos[:, None], bidirectional=self.bidirectional,
        num_buckets=cfg.relative_attention_num_buckets,
        max_distance=cfg.relative_attention_max_distance)
    bias = jnp.take(table, buckets, axis=0)           # [T, S, H]
    bias = jnp.transpose(bias, (2, 0, 1))[None]       # [1, H, T, S] float32
    return jax.lax.stop_gradient(bias) if cfg.freeze_relative_attention_bias else bias


def _cudnn_attention_globals() -> Optional[dict]:
  """The globals of the function `jax.nn.dot_product_attention` calls for cuDNN (JAX's private
  fused-attention module), found through the call itself in case a JAX moves that code."""
  try:
    from jax._src.nn import functions as nn_functions
  except ImportError:
    return None
  callee = getattr(nn_functions, "cudnn_dot_product_attention", None)
  return getattr(inspect.unwrap(callee), "__globals__", None) if callee else None


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
  logging.getLogger(__name__).warning(message)


@contextlib.contextmanager
def _cudnn_without_bias_grad():
  """While tracing: JAX's cuDNN attention builds a backward without the bias gradient.

  JAX asks cuDNN for that gradient whenever a bias is passed (0.10's `should_export_dbias` is
  always True; 0.11.2 removed it and asks for any explicit bias), and it costs a reduction
  over the batch in every layer. A frozen bias needs none. The flag is the custom-VJP
  function's `variadic_args=(has_bias, has_dbias)` argument; its position moved in 0.12, so
  the wrapper binds by name. Where a JAX has no such argument it only warns: the bias stays
  frozen (its gradient is stopped), the step is just not faster. The patch is process-wide
  while it lasts: trace nothing else with cuDNN attention from another thread meanwhile.
  """
  space = _cudnn_attention_globals()
  original = space.get("_dot_product_attention") if space else None
  try:
    signature = inspect.signature(original) if callable(original) else None
  except (TypeError, ValueError):
    signature = None
  if signature is None or "variadic_args" not in signature.parameters:
    _warn_once("freeze_relative_attention_bias: this JAX's cuDNN attention has no "
               "_dot_product_attention(variadic_args=...) to turn the bias gradient off; "
               "the bias is frozen, but cuDNN still computes its gradient")
    yield
    return

  def without_bias_grad(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    flags = tuple(bound.arguments["variadic_args"])  # (has_bias, has_dbias, ...)
    if len(flags) >= 2:
      bound.arguments["variadic_args"] = (flags[0], False, *flags[2:])
    return original(*bound.args, **bound.kwargs)

  space["_dot_product_attention"] = without_bias_grad
  try:
    yield
  finally:
    space["_dot_product_attention"] = original


def _mask_bias(mask: Array, dtype) -> Array:
  """float32 additive bias: 0 where `mask`, else a value that stays finite once cast to
  `dtype` (-1e10 is -inf in float16, and a fully masked row of -inf gives NaN)."""
  return jnp.where(mask, 0.0, max(_MASK_VALUE, 0.5 * float(jnp.finfo(dtype).min))).astype(jnp.float32)


def _cudnn_attention(q: Array, k: Array, v: Array, bias: Optional[Array], mask: Optional[Array],
                     *, causal: bool, kv_lengths: Optional[Array], bias_grad: bool = True) -> Array:
  """cuDNN flash attention with T5's additive bias; q [B, T, H, K], k/v [B, S, H, K].

  The relative-position bias goes in as [1, H, T, S] (cuDNN broadcasts it over the batch and
  returns its gradient, unless `bias_grad` is False); padding goes in as key lengths and
  causality as a flag, so no [B, H, T, S] tensor is formed. A general mask (packed segments)
  is folded into a full bias, which needs no gradient of its own.
  """
  bias_grad = bias_grad and bias is not None
  exact = causal or kv_lengths is not None
  if not exact and mask is not None:
    fold = _mask_bias(mask, q.dtype)
    bias = fold if bias is None else bias + fold
  with contextlib.nullcontext() if bias is None or bias_grad else _cudnn_without_bias_grad():
    return jax.nn.dot_product_attention(
        q, k, v, bias=None if bias is None else bias.astype(q.dtype), scale=1.0,
        is_causal=causal, key_value_seq_lengths=kv_lengths, implementation="cudnn")


class MultiHeadAttention(nn.Module):
  """T5 attention: no 1/sqrt(d) scaling (folded into the query init), no biases.

  `decode=True` uses the 'cache' collection: self-attention writes the new key/value at
  `decode_position`; cross-attention (`cross=True`) projects the encoder output once.
  """
  config: T5Config
  deterministic: bool = True
  decode: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x_q: Array, x_kv: Array, bias: Optional[Array], mask: Optional[Array],
               decode_position: Optional[Array] = None, *, causal: bool = False,
               kv_lengths: Optional[Array] = None) -> Array:
    """x_q [B, T, D], x_kv [B, S, D], bias [1|B, H, T, S] float32, mask [B|1, 1, T|1, S] bool.

    `causal` and `kv_lengths` [B] int32, when given, describe `mask` exactly (causal, and/or
    keys >= kv_lengths are padding): the cuDNN path then uses them instead of the mask.
    """
    cfg = self.config
    dt = cfg.compute_dtype
    d, h, k = cfg.d_model, cfg.num_heads, cfg.d_kv
    qkv_axes = ("embed", "heads", "kv")
    dense = functools.partial(Dense, in_shape=(d,), out_shape=(h, k), axes=qkv_axes, dtype=dt)
    query = dense(kernel_init=_variance_scaling(1.0 / k, 0, (1, 2)), name="query")
    key_proj = dense(kernel_init=_variance_scaling(1.0, 0, (1, 2)), name="key")
    value_proj = dense(kernel_init=_variance_scaling(1.0, 0, (1, 2)), name="value")

    # Self-attention (not cross) is called with x_q = x_kv.
    project_kv = lambda x: (fused_dense(x, (key_proj, value_proj)) if cfg.fused_projections
                            else (key_proj(x), value_proj(x)))
    if cfg.fused_projections and not self.cross:
      q, key, value = fused_dense(x_q, (query, key_proj, value_proj))
      project_kv = lambda x: (key, value)
    else:
      q = query(x_q)
    q = _constrain(q, ("batch", "length", "heads", "kv"))
    if self.decode and self.cross:
      # Encoder K/V never change during decoding: project once, when the cache is created.
      initialised = self.has_variable("cache", "cached_key")
      if initialised:
        key = self.get_variable("cache", "cached_key")
        value = self.get_variable("cache", "cached_value")
      else:
        key, value = project_kv(x_kv)
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
    else:
      key, value = project_kv(x_kv)
      if self.decode:
        key, value = self._update_cache(key, value, decode_position)
    key = _constrain(key, ("batch", "length", "heads", "kv"))
    value = _constrain(value, ("batch", "length", "heads", "kv"))

    # cuDNN's kernel has no dropout on the attention weights: training with dropout takes the
    # XLA path, so the model trained is the one configured (at a memory cost).
    use_cudnn = cfg.attention_impl == "cudnn" and not self.decode and (
        self.deterministic or cfg.dropout_rate == 0)
    if use_cudnn:
      out = _cudnn_attention(q, key.astype(dt), value.astype(dt), bias, mask,
                             causal=causal, kv_lengths=kv_lengths,
                             bias_grad=not cfg.freeze_relative_attention_bias)
    else:
      logits = jnp.einsum("bthk,bshk->bhts", q, key.astype(dt),
                          preferred_element_type=jnp.float32)
      if bias is not None:
        logits = logits + bias
      if mask is not None:
        logits = jnp.where(mask, logits, _MASK_VALUE)
      weights = jax.nn.softmax(logits, axis=-1).astype(dt)
      if not self.deterministic and cfg.dropout_rate > 0:
        weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=False)
      out = jnp.einsum("bhts,bshk->bthk", weights, value.astype(dt))
    out = _constrain(out, ("batch", "length", "heads", "kv"))
    out_proj = Dense(in_shape=(h, k), out_shape=(d,), axes=("heads", "kv", "embed"),
                     kernel_init=_variance_scaling(1.0, (0, 1), 2), dtype=dt, name="out")
    return out_proj(out)

  def _update_cache(self, key: Array, value: Array, position: Optional[Array]):
    """Writes one step's key/value [B, 1, H, K]; returns the full cache [B, L, H, K]."""
    initialised = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    if not initialised:  # shape-defining call: the full-length inputs only size the cache
      return key, value
    if key.shape[1] != 1:
      raise ValueError(f"decode=True takes one token per step, got length {key.shape[1]}")
    start = (0, position, 0, 0)
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
    return cached_key.value, cached_value.value


class MlpBlock(nn.Module):
  """relu: wo(relu(wi x)); gated-gelu: wo(gelu_tanh(wi_0 x) * wi_1 x)."""
  config: T5Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dt = cfg.compute_dtype
    wi = functools.partial(Dense, in_shape=(cfg.d_model,), out_shape=(cfg.d_ff,),
                           axes=("embed", "mlp"), kernel_init=_variance_scaling(1.0, 0, 1), dtype=dt)
    if cfg.feed_forward_proj == "relu":
      hidden = jax.nn.relu(wi(name="wi")(x))
    else:  # HF's "gelu_new" is the tanh approximation
      wi_0, wi_1 = wi(name="wi_0"), wi(name="wi_1")
      gate, linear = (fused_dense(x, (wi_0, wi_1)) if cfg.fused_projections
                      else (wi_0(x), wi_1(x)))
      hidden = jax.nn.gelu(gate, approximate=True) * linear
    hidden = _constrain(hidden, ("batch", "length", "mlp"))
    if not self.deterministic and cfg.dropout_rate > 0:
      hidden = nn.Dropout(cfg.dropout_rate)(hidden, deterministic=False)
    wo = Dense(in_shape=(cfg.d_ff,), out_shape=(cfg.d_model,), axes=("mlp", "embed"),
               kernel_init=_variance_scaling(1.0, 0, 1), dtype=dt, name="wo")
    return wo(hidden)


def _dropout(cfg: T5Config, x: Array, deterministic: bool) -> Array:
  if deterministic or cfg.dropout_rate == 0:
    return x
  return nn.Dropout(cfg.dropout_rate)(x, deterministic=False)


_ACT = ("batch", "length", "embed")


class EncoderLayer(nn.Module):
  config: T5Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, bias: Array, mask: Array,
               kv_lengths: Optional[Array] = None) -> Array:
    cfg = self.config
    norm = functools.partial(RMSNorm, epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype)
    y = norm(name="pre_attention_layer_norm")(x)
    y = MultiHeadAttention(cfg, self.deterministic, name="attention")(
        y, y, bias, mask, kv_lengths=kv_lengths)
    x = _constrain(x + nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic), _ACT)
    y = norm(name="pre_mlp_layer_norm")(x)
    y = MlpBlock(cfg, self.deterministic, name="mlp")(y)
    return _constrain(x + nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic),
                      _ACT), None


class DecoderLayer(nn.Module):
  """`self_causal`: the self-attention mask is exactly causal (unpacked, not decoding)."""
  config: T5Config
  deterministic: bool = True
  decode: bool = False
  self_causal: bool = False

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array, self_mask: Optional[Array],
               cross_mask: Optional[Array], decode_position: Optional[Array] = None,
               cross_lengths: Optional[Array] = None) -> Array:
    cfg = self.config
    det = self.deterministic
    norm = functools.partial(RMSNorm, epsilon=cfg.layer_norm_epsilon, dtype=cfg.compute_dtype)
    y = norm(name="pre_self_attention_layer_norm")(x)
    y = MultiHeadAttention(cfg, det, self.decode, name="self_attention")(
        y, y, self_bias, self_mask, decode_position, causal=self.self_causal)
    x = _constrain(x + nn.Dropout(cfg.dropout_rate)(y, deterministic=det), _ACT)
    y = norm(name="pre_cross_attention_layer_norm")(x)
    y = MultiHeadAttention(cfg, det, self.decode, cross=True, name="encoder_decoder_attention")(
        y, encoded, None, cross_mask, kv_lengths=cross_lengths)
    x = _constrain(x + nn.Dropout(cfg.dropout_rate)(y, deterministic=det), _ACT)
    y = norm(name="pre_mlp_layer_norm")(x)
    y = MlpBlock(cfg, det, name="mlp")(y)
    return _constrain(x + nn.Dropout(cfg.dropout_rate)(y, deterministic=det), _ACT), None


def _maybe_remat(cls, cfg: T5Config):
  if cfg.remat_policy == "none":
    return cls
  policy = _remat_policy(cfg.remat_policy)
  # Inside a scan, CSE across iterations cannot happen, so its prevention only costs time.
  return nn.remat(cls, policy=policy, prevent_cse=not cfg.scan_layers)


def _cast_kernels(params, dtype):
  """Every `kernel` leaf of a params tree (boxed or not) in `dtype`; norms' scales stay."""
  def cast(path, leaf):
    if getattr(path[-1], "key", None) != "kernel":
      return leaf
    if isinstance(leaf, nn.meta.AxisMetadata):
      return leaf.replace_boxed(leaf.unbox().astype(dtype))
    return leaf.astype(dtype)
  return jax.tree_util.tree_map_with_path(
      cast, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _run_layers(parent: nn.Module, layer_cls, cfg: T5Config, n: int, module_args: tuple, x: Array,
                *args) -> Array:
  """n layers on x: a Python loop (params `layers_{i}`), or with cfg.scan_layers one nn.scan
  (params stacked under `layers`, logical axis 'layers'; compiles one layer body). Must be
  called inside `parent`'s compact method; the other call args are the same every layer.
  cfg.scan_unroll > 1 puts that many layers in each loop iteration (longer compile, fewer
  iterations); the params and numbers are the same. cfg.cast_kernels_before_scan casts the
  stacked kernels to the compute dtype once, outside the loop: the matmuls read bfloat16
  kernels, and the backward loop stacks bfloat16 kernel gradients instead of float32 ones
  (the same values: a per-layer cast rounds them to bfloat16 too), so the loop's buffers and
  their zero-fill are half the size. It costs a bfloat16 copy of the kernels for the step."""
  layer_cls = _maybe_remat(layer_cls, cfg)
  if not cfg.scan_layers:
    for i in range(n):
      x, _ = layer_cls(*module_args, name=f"layers_{i}")(x, *args)
    return x
  stack = nn.scan(layer_cls, variable_axes={"params": 0, "cache": 0},
                  split_rngs={"params": True, "dropout": True},
                  in_axes=(nn.broadcast,) * len(args), length=n, unroll=cfg.scan_unroll,
                  metadata_params={nn.PARTITION_NAME: "layers"})
  if cfg.cast_kernels_before_scan and cfg.dtype != "float32" and not parent.is_initializing():
    stack = nn.map_variables(stack, "params", mutable=False,
                             trans_in_fn=functools.partial(_cast_kernels, dtype=cfg.compute_dtype))
  x, _ = stack(*module_args, name="layers")(x, *args)
  return x


def stack_layers(tree):
  """`layers_0..layers_{n-1}` subtrees -> one `layers` subtree of stacked arrays (recursively):
  the parameter layout of T5Config(scan_layers=True). Other keys are kept."""
  if not isinstance(tree, Mapping):
    return tree
  names = [k for k in tree if re.fullmatch(r"layers_\d+", str(k))]
  out = {k: stack_layers(v) for k, v in tree.items() if k not in names}
  if names:
    order = [tree[f"layers_{i}"] for i in range(len(names))]
    out["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                           *order)
  return out


def unstack_layers(tree):
  """Inverse of `stack_layers`: the unrolled layout (scan_layers=False, HF, t5x)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: unstack_layers(v) for k, v in tree.items() if k != "layers"}
  if "layers" in tree:
    n = jax.tree_util.tree_leaves(tree["layers"])[0].shape[0]
    for i in range(n):
      out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x: np.asarray(x)[i], tree["layers"])
  return out


def match_layer_layout(tree, like):
  """`tree` in the layer layout (stacked or unrolled) of `like`, a param tree of the model."""
  def has(t, key):
    return isinstance(t, Mapping) and (key in t or any(has(v, key) for v in t.values()))
  if has(like, "layers") and not has(tree, "layers"):
    return stack_layers(tree)
  if not has(like, "layers") and has(tree, "layers"):
    return unstack_layers(tree)
  return tree


def _key_lengths(mask: Array) -> Array:
  """[B, S] right-padded mask -> [B] lengths, at least 1: an all-padding row (a batch filler)
  then attends one pad key instead of none, which would give NaN in cuDNN."""
  return jnp.maximum(jnp.sum(mask, axis=-1, dtype=jnp.int32), 1)


def _segment_mask(q_seg: Array, k_seg: Array) -> Array:
  """[B, T], [B, S] -> [B, 1, T, S] same-segment mask."""
  return (q_seg[:, :, None] == k_seg[:, None, :])[:, None]


class Encoder(nn.Module):
  """T5 encoder stack on already-embedded inputs."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, input_mask: Array, segment_ids: Optional[Array] = None,
               enable_dropout: bool = False) -> Array:
    """x [B, S, D] embedded, input_mask [B, S] bool -> [B, S, D] compute dtype."""
    cfg = self.config
    det = not enable_dropout
    s = x.shape[1]
    pos = jnp.arange(s)
    bias = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(pos, pos)
    mask = input_mask[:, None, None, :]
    lengths = None
    if segment_ids is not None:
      mask = mask & _segment_mask(segment_ids, segment_ids)
    else:  # right padding: the mask is exactly "key < length" (cuDNN takes lengths)
      lengths = _key_lengths(input_mask)
    x = _constrain(_dropout(cfg, x, det), _ACT)
    x = _run_layers(self, EncoderLayer, cfg, cfg.num_encoder_layers, (cfg, det), x, bias, mask, lengths)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="encoder_norm")(x)
    return _constrain(_dropout(cfg, x, det), _ACT)


class Decoder(nn.Module):
  """T5 decoder stack on already-embedded inputs; returns the final normed hidden state."""
  config: T5Config

  @nn.compact
  def __call__(self, x: Array, encoded: Array, encoder_mask: Array,
               decoder_segment_ids: Optional[Array] = None,
               encoder_segment_ids: Optional[Array] = None,
               enable_dropout: bool = False, decode: bool = False) -> Array:
    """x [B, T, D], encoded [B, S, D], encoder_mask [B, S] bool -> [B, T, D]."""
    cfg = self.config
    det = not enable_dropout or decode
    t = x.shape[1]
    relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
    cross_mask = encoder_mask[:, None, None, :]
    position = None
    packed = decoder_segment_ids is not None or encoder_segment_ids is not None
    cross_lengths = None if packed else _key_lengths(encoder_mask)
    if decode:
      if decoder_segment_ids is not None:
        raise ValueError("decode=True does not support decoder_segment_ids")
      initialised = self.has_variable("cache", "position")
      pos_var = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      if initialised:
        # One step: query at `position`, keys are the whole cache [0, L).
        position = pos_var.value
        max_len = self.get_variable("cache", "max_length")
        k_pos = jnp.arange(max_len.shape[0])
        self_bias = relpos(position[None], k_pos)
        self_mask = (k_pos <= position)[None, None, None, :]
        pos_var.value = position + 1
      else:
        # Shape-defining call with the full-length decoder input: sizes the caches.
        self.put_variable("cache", "max_length", jnp.zeros((t,), jnp.int8))
        pos = jnp.arange(t)
        self_bias = relpos(pos, pos)
        self_mask = (pos[None, :] <= pos[:, None])[None, None]
    else:
      pos = jnp.arange(t)
      self_bias = relpos(pos, pos)
      self_mask = (pos[None, :] <= pos[:, None])[None, None]
      if decoder_segment_ids is not None:
        self_mask = self_mask & _segment_mask(decoder_segment_ids, decoder_segment_ids)
        if encoder_segment_ids is not None:
          cross_mask = cross_mask & _segment_mask(decoder_segment_ids, encoder_segment_ids)
    x = _constrain(_dropout(cfg, x, det), _ACT)
    self_causal = not decode and decoder_segment_ids is None
    x = _run_layers(self, DecoderLayer, cfg, cfg.num_decoder_layers, (cfg, det, decode, self_causal),
                    x, encoded, self_bias, self_mask, cross_mask, position, cross_lengths)
    x = RMSNorm(cfg.layer_norm_epsilon, cfg.compute_dtype, name="decoder_norm")(x)
    return _constrain(_dropout(cfg, x, det), _ACT)


# ----------------------------------------------------------------------------- models


class T5(nn.Module):
  """T5 encoder-decoder. Padding is token == pad_id; segment ids (1..n, 0 = pad) pack rows.

  Decoder self-attention is causal (AND same-segment when packed). Decoder padding needs no
  mask: with right padding no real position attends a later (padded) one.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = Embed(cfg)
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    if not cfg.tie_word_embeddings:
      self.lm_head = Dense(in_shape=(cfg.d_model,), out_shape=(cfg.vocab_size,),
                           axes=("embed", "vocab"), kernel_init=_variance_scaling(1.0, 0, 1),
                           dtype=cfg.compute_dtype)

  def encode(self, encoder_input_tokens: Array, *, encoder_segment_ids: Optional[Array] = None,
             enable_dropout: bool = False) -> Array:
    """[B, S] int -> encoded [B, S, D] (compute dtype)."""
    tokens = _constrain(encoder_input_tokens, ("batch", "length"))
    mask = tokens != self.config.pad_id
    return self.encoder(self.token_embedder(tokens), mask, encoder_segment_ids, enable_dropout)

  def decode_hidden(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
                    *, encoder_segment_ids=None, decoder_segment_ids=None,
                    enable_dropout: bool = False, decode: bool = False) -> Array:
    """Final decoder hidden states [B, T, D], before the output projection.

    logits == hidden.astype(f32) @ output_embedding(config, params) (up to dtype rounding);
    use this to compute log-probs in vocabulary chunks without [B, T, V] logits.
    """
    encoder_mask = encoder_input_tokens != self.config.pad_id
    x = self.token_embedder(_constrain(decoder_input_tokens, ("batch", "length")))
    return self.decoder(x, encoded, encoder_mask, decoder_segment_ids, encoder_segment_ids,
                        enable_dropout, decode)

  def logits_from_hidden(self, hidden: Array) -> Array:
    """[B, T, D] -> float32 logits [B, T, V]."""
    cfg = self.config
    if cfg.tie_word_embeddings:
      logits = self.token_embedder.attend(hidden * (cfg.d_model ** -0.5))
    else:
      logits = self.lm_head(hidden)
    return _constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
             encoder_segment_ids: Optional[Array] = None,
             decoder_segment_ids: Optional[Array] = None,
             enable_dropout: bool = False, decode: bool = False) -> Array:
    """-> float32 logits [B, T, V]. With decode=True, T must be 1 (after cache creation)."""
    hidden = self.decode_hidden(encoded, encoder_input_tokens, decoder_input_tokens,
                                encoder_segment_ids=encoder_segment_ids,
                                decoder_segment_ids=decoder_segment_ids,
                                enable_dropout=enable_dropout, decode=decode)
    return self.logits_from_hidden(hidden)

  def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array, *,
               encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               enable_dropout: bool = False, decode: bool = False) -> Array:
    """[B, S], [B, T] int -> float32 logits [B, T, V]."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids,
                       enable_dropout=enable_dropout, decode=decode)


def output_embedding(config: T5Config, params) -> Array:
  """The [D, V] float32 matrix W with logits = decoder_hidden @ W (tied scaling folded in)."""
  if config.tie_word_embeddings:
    return jnp.asarray(params["token_embedder"]["embedding"]).T * (config.d_model ** -0.5)
  return jnp.asarray(params["lm_head"]["kernel"])


def _masked_mean_pool(x: Array, mask: Array, segment_ids: Optional[Array],
                      num_segments: Optional[int]) -> Array:
  """x [B, S, D], mask [B, S] -> [B, D] (or [B, K, D] per segment k = id k+1), float32."""
  x = x.astype(jnp.float32)
  if num_segments is None:
    weights = mask.astype(jnp.float32)[:, :, None]                        # [B, S, 1]
  else:
    if segment_ids is None:
      raise ValueError("num_segments needs encoder_segment_ids")
    ks = jnp.arange(1, num_segments + 1)
    weights = ((segment_ids[:, :, None] == ks) & mask[:, :, None]).astype(jnp.float32)  # [B,S,K]
  total = jnp.einsum("bsk,bsd->bkd", weights, x)
  count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)[:, :, None]           # [B, K, 1]
  pooled = total / count
  return pooled[:, 0] if num_segments is None else pooled


class ValueHead(nn.Module):
  """Scalar head on pooled features, zero-initialised so V starts at 0."""

  @nn.compact
  def __call__(self, pooled: Array) -> Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (pooled.shape[-1],), jnp.float32)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                      jnp.float32)
    return jnp.einsum("...d,d->...", pooled.astype(jnp.float32), kernel) + bias


class ValueNetwork(nn.Module):
  """V(x): a separate T5 encoder, masked mean-pool, scalar head. Returns float32 [B] / [B, K].

  Params: {'token_embedder', 'encoder'} (same structure as T5's) and 'value_head'.
  """
  config: T5Config

  def setup(self):
    self.token_embedder = Embed(self.config)
    self.encoder = Encoder(self.config)
    self.value_head = ValueHead()

  def __call__(self, encoder_input_tokens: Array, *, encoder_segment_ids: Optional[Array] = None,
               num_segments: Optional[int] = None, enable_dropout: bool = False) -> Array:
    tokens = _constrain(encoder_input_tokens, ("batch", "length"))
    mask = tokens != self.config.pad_id
    encoded = self.encoder(self.token_embedder(tokens), mask, encoder_segment_ids, enable_dropout)
    return self.value_head(_masked_mean_pool(encoded, mask, encoder_segment_ids, num_segments))


def init_value_from_policy(value_params, policy_params):
  """Returns value_params with token_embedder + encoder copied from the policy's params.

  Either tree may be boxed (nn.LogicallyPartitioned, as from `init`) or unboxed; the
  result keeps value_params' boxing and dtypes.
  """
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  out = dict(value_params)
  for name in ("token_embedder", "encoder"):
    if name not in policy_params or name not in value_params:
      raise ValueError(f"init_value_from_policy: missing '{name}' in params")
    src, dst = nn.unbox(policy_params[name]), value_params[name]
    dst_plain = nn.unbox(dst)
    if jax.tree_util.tree_structure(src) != jax.tree_util.tree_structure(dst_plain):
      raise ValueError(f"init_value_from_policy: '{name}' trees differ (different configs?)")
    for a, b in zip(jax.tree_util.tree_leaves(src), jax.tree_util.tree_leaves(dst_plain)):
      if np.shape(a) != np.shape(b):
        raise ValueError(f"init_value_from_policy: '{name}' shapes differ: "
                         f"{np.shape(a)} vs {np.shape(b)}")
    src_leaves = iter(jax.tree_util.tree_leaves(src))

    def copy(leaf):
      src_leaf, dtype = next(src_leaves), np.dtype(nn.unbox(leaf).dtype)
      # host arrays (a checkpoint's) stay on the host, to be sharded by the caller
      new = np.asarray(src_leaf, dtype) if isinstance(src_leaf, np.ndarray) else jnp.asarray(src_leaf, dtype)
      return leaf.replace_boxed(new) if is_box(leaf) else new

    out[name] = jax.tree_util.tree_map(copy, dst, is_leaf=is_box)
  return out


class SharedEncoderValueHead(nn.Module):
  """Ablation: a value head on the policy's encoder output. Params: {'value_head'}.

  encoded [B, S, D], input_mask [B, S] bool -> float32 [B] (or [B, K] with num_segments).
  """

  @nn.compact
  def __call__(self, encoded: Array, input_mask: Array, *,
               encoder_segment_ids: Optional[Array] = None,
               num_segments: Optional[int] = None) -> Array:
    pooled = _masked_mean_pool(encoded, input_mask, encoder_segment_ids, num_segments)
    return ValueHead(name="value_head")(pooled)


class ScalarValue(nn.Module):
  """Ablation: one learned scalar (init 0) for every example. Params: {'value'}."""

  @nn.compact
  def __call__(self, encoder_input_tokens: Array, *, encoder_segment_ids: Optional[Array] = None,
               num_segments: Optional[int] = None, enable_dropout: bool = False) -> Array:
    value = self.param("value", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                       jnp.float32)
    shape = encoder_input_tokens.shape[:1] + (() if num_segments is None else (num_segments,))
    return jnp.broadcast_to(value, shape)
