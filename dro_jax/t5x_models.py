"""DRO-V and KTO as t5x models, for `python -m t5x.train` (gin_configs/t5x/).

t5x is not a dependency of dro_jax: it is imported lazily, when a model class is
first used. Without it, `DROEncoderDecoderModel` / `KTOEncoderDecoderModel` raise
`T5XNotInstalledError` (an ImportError) with a one-line message.

The classes are thin adapters over `dro_jax.models`: the losses, metric values,
scoring and decoding are `DROModel` / `KTOModel`'s own (tested in
tests/test_models.py). What the adapters add is t5x's contract:

  * params are `{'policy': <T5>, 'value': <value net>}` in *t5x's T5 layout*
    (`to_t5x_layout` / `from_t5x_layout`; converted inside each call): the policy
    subtree is a plain t5x T5 1.1 tree, so a t5x T5 checkpoint restores into it
    with `DRO_ASSIGNMENT_MAP` (gin_configs/t5x/), and t5x's own T5 gives the same
    logits on it as dro_jax's network.
    `get_initial_variables` also returns `params_axes` (t5x's logical axes).
  * metrics are clu metrics: `loss` is t5x's `AveragePerStep`; per-example means
    are example-weighted `clu.metrics.Average`s, `*/std` are averaged per batch,
    counts are t5x `Sum`s.
  * reference log-probs come from the batch feature `ref_logprobs` (DRO-V;
    `python -m dro_jax.score`). KTO also needs the reference on mismatched
    in-batch pairs, which cannot be precomputed: `KTOEncoderDecoderModel` keeps a
    frozen copy of the policy in the non-trainable variable collection
    `reference` (a t5x "flax mutable": checkpointed, never optimised).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import traverse_util
from flax.core import frozen_dict

from dro_jax import models, network
from dro_jax.data import converters

INSTALL_HINT = ("install it from source: pip install git+https://github.com/google/airio "
                "git+https://github.com/google-research/jestimator git+https://github.com/google-research/t5x")

# t5x's RestoreCheckpointConfig.assignment_map for starting from a plain t5x T5
# checkpoint (keys 'target/...' and 'state/param_states/...'): the policy and the
# value network's encoder + embeddings come from the T5; the value head starts
# from scratch (needs fallback_to_scratch=True).
DRO_ASSIGNMENT_MAP = (
    (r"(.*)/policy/(.*)", r"\1/\2"),
    (r"(.*)/value/(token_embedder|encoder)/(.*)", r"\1/\2/\3"),
    (r"(.*)/value/value_head/(.*)", None),
)


def dro_assignment_map(value_kind: str = "separate") -> tuple:
  """`DRO_ASSIGNMENT_MAP` for a DRO-V model's `value_kind`: t5x refuses a rule that matches
  nothing, and 'shared' and 'scalar' have no value encoder (their value params start from
  scratch)."""
  if value_kind == "separate":
    return DRO_ASSIGNMENT_MAP
  if value_kind in ("shared", "scalar"):
    return (DRO_ASSIGNMENT_MAP[0], (r"(target|state/param_states)/value/(.*)", None))
  raise ValueError(f"value_kind: expected separate|shared|scalar, got {value_kind!r}")
# KTO: the policy and the frozen reference both come from the T5.
KTO_ASSIGNMENT_MAP = (
    (r"(.*)/policy/(.*)", r"\1/\2"),
    (r"flax_mutables/reference/(.*)", r"target/\1"),
)


class T5XNotInstalledError(ImportError):
  """dro_jax.t5x_models was used where t5x is not importable."""


def _import_t5x():
  try:
    # pylint: disable=g-import-not-at-top
    import t5x.metrics
    import t5x.models
    import t5x.optimizers  # noqa: F401
  except ImportError as e:  # one clear error, not a chain of tracebacks
    raise T5XNotInstalledError(
        f"dro_jax.t5x_models needs t5x, which is not importable ({e}); {INSTALL_HINT}") from None
  return t5x


# ---------------------------------------------------------------- parameter layout
# t5x's T5 (t5x/examples/t5) names its params as dro_jax's network does, except:
#   lm_head/kernel                      <-> decoder/logits_dense/kernel
#   */relpos_bias/rel_embedding [R, H]  <-> [H, R]
#   attention {query,key,value}/kernel [D, H, K] <-> [D, H*K]  (embed, joined_kv)
#   attention out/kernel [H, K, D]       <-> [H*K, D]          (joined_kv, embed)
_LM_HEAD = ("lm_head",)
_T5X_LM_HEAD = ("decoder", "logits_dense")
_ATTENTIONS = ("attention", "self_attention", "encoder_decoder_attention")


def _kind(k) -> Optional[str]:
  if k[-2:] == ("relpos_bias", "rel_embedding"):
    return "relpos"
  if len(k) >= 3 and k[-1] == "kernel" and k[-3] in _ATTENTIONS:
    return "out" if k[-2] == "out" else "qkv"
  return None


def _relayout(tree, key_fn, leaf_fn):
  flat = traverse_util.flatten_dict(frozen_dict.unfreeze(tree))
  return traverse_util.unflatten_dict({key_fn(k): leaf_fn(_kind(k), v) for k, v in flat.items()})


def _leaf_to_t5x(kind, v):
  if isinstance(v, tuple):  # logical axis names
    return {"relpos": v[::-1], "qkv": ("embed", "joined_kv"), "out": ("joined_kv", "embed")}.get(kind, v)
  if kind == "relpos":
    return jnp.swapaxes(v, 0, 1)
  if kind == "qkv":
    return jnp.reshape(v, (v.shape[0], -1))
  if kind == "out":
    return jnp.reshape(v, (-1, v.shape[-1]))
  return v


def to_t5x_layout(tree):
  """A dro_jax T5 / value-network param tree (or its logical axis names) in t5x's layout."""
  key_fn = lambda k: _T5X_LM_HEAD + k[1:] if k[:1] == _LM_HEAD else k  # noqa: E731
  return _relayout(tree, key_fn, _leaf_to_t5x)


def from_t5x_layout(tree, config: network.T5Config):
  """Inverse of `to_t5x_layout`: a t5x T5 param tree as dro_jax's network reads it."""
  h, d = config.num_heads, config.d_kv

  def leaf(kind, v):
    if kind == "relpos":
      return jnp.swapaxes(v, 0, 1)
    if kind == "qkv":
      return jnp.reshape(v, (v.shape[0], h, d))
    if kind == "out":
      return jnp.reshape(v, (h, d, v.shape[-1]))
    return v

  key_fn = lambda k: _LM_HEAD + k[2:] if k[:2] == _T5X_LM_HEAD else k  # noqa: E731
  return _relayout(tree, key_fn, leaf)


def _model_params_from_t5x(params, config) -> dict:
  return {k: from_t5x_layout(v, config) for k, v in params.items()}


def initial_variables_t5x(model: models.BaseModel, rng, input_shapes,
                          reference: bool = False) -> dict:
  """`model.get_initial_variables` as t5x wants it: unboxed params in t5x layout
  plus `params_axes` (and a `reference` copy of the policy, with its axes)."""
  from flax import linen as nn
  from flax.linen import partitioning as flax_partitioning

  boxed = model.get_initial_variables(rng, input_shapes)["params"]
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  names = jax.tree_util.tree_map(lambda b: tuple(b.names), boxed, is_leaf=is_box)
  # empty subtrees (KTO's 'value') are left out: t5x's checkpoints drop them
  params = {k: to_t5x_layout(v) for k, v in nn.meta.unbox(boxed).items() if v}
  names = {k: to_t5x_layout(v) for k, v in names.items() if k in params}

  def axes(tree):
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({
        k[:-1] + (k[-1] + "_axes",): flax_partitioning.AxisMetadata(names=v)
        for k, v in flat.items()})

  out = {"params": params, "params_axes": axes(names)}
  if reference:
    out["reference"] = jax.tree_util.tree_map(jnp.copy, params["policy"])
    out["reference_axes"] = axes(names["policy"])
  return frozen_dict.freeze(out)


# -------------------------------------------------------------------- metrics
def _is_count(name: str) -> bool:
  return name == "examples" or name.rsplit("/", 1)[-1].startswith("num_")


def clu_metrics(loss: jax.Array, metrics: Mapping[str, jax.Array], batch_size: int) -> dict:
  """dro_jax's scalar metrics as the clu metrics t5x's trainer merges and writes.

  Means become example-weighted `Average`s (exact over microbatches and logging
  steps), `*/std` the average over batches, counts t5x `Sum`s; `loss` is t5x's
  `AveragePerStep`, as in t5x's own models.
  """
  t5x = _import_t5x()
  from clu import metrics as clu

  t5x_metrics = t5x.metrics
  n = jnp.asarray(metrics["examples"], jnp.float32)
  out = {
      "loss": t5x_metrics.AveragePerStep(total=loss),
      "timing/seqs": t5x_metrics.Sum(jnp.asarray(batch_size)),
      "timing/seqs_per_second": t5x_metrics.TimeRate.from_model_output(numerator=batch_size),
      "timing/steps_per_second": t5x_metrics.StepsPerTime.from_model_output(),
      "timing/seconds": t5x_metrics.Time(),
  }
  for name, v in metrics.items():
    v = jnp.asarray(v, jnp.float32)
    if _is_count(name):
      out[name] = t5x_metrics.Sum(v)
    elif name.endswith("/std"):
      out[name] = clu.Average(total=v, count=jnp.ones((), jnp.float32))
    else:
      out[name] = clu.Average(total=v * n, count=n)
  return out


# ---------------------------------------------------------------- the classes
def _decoder_kwargs(default, decoder_params, rng, return_all_decodes, num_decodes,
                    prompt_with_targets):
  if prompt_with_targets:
    raise ValueError("prompt_with_targets is not supported by dro_jax's decoding")
  num = default.num_decodes if num_decodes is None else num_decodes
  all_decodes = default.return_all_decodes if return_all_decodes is None else return_all_decodes
  if num != 1 or all_decodes:
    raise ValueError("dro_jax's decoding returns one decode per example "
                     f"(got num_decodes={num}, return_all_decodes={all_decodes})")
  kw = dict(decoder_params or {})
  rng = kw.pop("decode_rng", rng)
  unknown = set(kw) - {"temperature", "top_k", "top_p", "max_length"}
  if unknown:
    raise ValueError(f"unsupported decoder_params: {sorted(unknown)} "
                     "(expected temperature, top_k, top_p, max_length, decode_rng)")
  return rng, kw


def _build_classes() -> dict:
  t5x = _import_t5x()
  EncoderDecoderModel = t5x.models.EncoderDecoderModel  # noqa: N806

  class _Adapter(EncoderDecoderModel):
    """Shared t5x plumbing around a dro_jax model (`self.dro`)."""

    FEATURE_CONVERTER_CLS = converters.DROFeatureConverter
    _reference = False

    def __init__(self, dro_model: models.BaseModel, vocabulary, optimizer_def, *,
                 output_vocabulary=None, loss_normalizing_factor: Optional[float] = None,
                 feature_converter_cls=None, default_decoder_params=None):
      if dro_model.config.scan_layers:
        raise ValueError("the t5x adapters need network.T5Config.scan_layers=False: t5x's "
                         "parameter layout has one subtree per layer")
      if loss_normalizing_factor is not None and (
          isinstance(loss_normalizing_factor, bool) or not isinstance(loss_normalizing_factor, (int, float))
          or not loss_normalizing_factor > 0):
        # t5x's token-count factors ('NUM_REAL_TARGET_TOKENS', ...) do not fit a per-example loss.
        raise ValueError("loss_normalizing_factor must be None (the per-example batch mean) or a positive "
                         f"number (the global batch size under microbatches), got {loss_normalizing_factor!r}")
      self.dro = dro_model
      super().__init__(
          module=dro_model.module, input_vocabulary=vocabulary,
          output_vocabulary=output_vocabulary or vocabulary, optimizer_def=optimizer_def,
          feature_converter_cls=feature_converter_cls,
          loss_normalizing_factor=loss_normalizing_factor,
          default_decoder_params=default_decoder_params)

    def get_initial_variables(self, rng, input_shapes, input_types=None):
      del input_types
      return initial_variables_t5x(self.dro, rng, input_shapes, reference=self._reference)

    def _dro_loss(self, params, batch, dropout_rng):
      loss, metrics = self.dro.loss_fn(params, batch, dropout_rng)
      if self._loss_normalizing_factor is not None:
        # per-example mean -> sum / factor: summed over t5x's microbatches this is
        # the full-batch mean when factor = the global batch size.
        loss = loss * metrics["examples"] / float(self._loss_normalizing_factor)
      batch_size = batch["encoder_input_tokens"].shape[0]
      return loss, clu_metrics(loss, metrics, batch_size)

    def _compute_logits(self, params, batch, dropout_rng=None, mutable=False,
                        other_variables=None):
      del mutable, other_variables
      return self.dro._apply_policy(  # pylint: disable=protected-access
          from_t5x_layout(params["policy"], self.dro.config), batch, dropout_rng)

    def score_batch(self, params, batch, return_intermediates: bool = False):
      """Sequence log-probs [B] of the targets under the policy (sum, or mean per
      token with logprob_normalization='mean')."""
      return self.dro.score_batch({"policy": from_t5x_layout(params["policy"], self.dro.config)}, batch,
                                  return_intermediates=return_intermediates)

    def predict_batch_with_aux(self, params, batch, rng=None, decoder_params=None,
                               return_all_decodes=None, num_decodes=None,
                               prompt_with_targets=False):
      """Greedy (or sampled: decoder_params temperature/top_k/top_p) decodes and
      their log-probs under the policy, aux {'scores': [B]}."""
      rng, kw = _decoder_kwargs(self._default_decoder_params, decoder_params, rng,
                                return_all_decodes, num_decodes, prompt_with_targets)
      policy = {"policy": from_t5x_layout(params["policy"], self.dro.config)}
      length = batch.get("decoder_input_tokens", batch.get("decoder_target_tokens"))
      kw.setdefault("max_length", length.shape[-1])
      tokens = self.dro.predict_batch(policy, batch, rng, **kw)
      scored = {
          "encoder_input_tokens": batch["encoder_input_tokens"],
          "decoder_target_tokens": tokens,
          "decoder_input_tokens": jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1],
          "decoder_loss_weights": (tokens != self.dro.config.pad_id).astype(jnp.int32),
      }
      return tokens, {"scores": self.dro.score_batch(policy, scored)}

  class DROEncoderDecoderModel(_Adapter):
    """DRO-V (policy + value network) under t5x: `dro_jax.models.DROModel.loss_fn`.

    Needs `ref_logprobs` in the batch (score the log with `python -m dro_jax.score`).
    """

    def __init__(self, config: network.T5Config, vocabulary, optimizer_def, *, tau: float = 1.0,
                 value_kind: str = "separate", logprob_normalization: str = "sum", **kwargs):
      if logprob_normalization != "sum":
        # The reference comes only from the log's ref_logprob, which dro_jax.score sums.
        raise ValueError("DRO-V under t5x reads the reference from the log's ref_logprob, a summed "
                         f"log-prob (dro_jax.score), so logprob_normalization must be 'sum', got "
                         f"{logprob_normalization!r}")
      super().__init__(models.DROModel(config, tau=tau, value_kind=value_kind,
                                       logprob_normalization=logprob_normalization),
                       vocabulary, optimizer_def, **kwargs)

    def loss_fn(self, params, batch, dropout_rng):
      if "ref_logprobs" not in batch:
        raise ValueError("DRO-V under t5x needs the 'ref_logprobs' feature: score the log "
                         "with `python -m dro_jax.score` and train on the scored log")
      return self._dro_loss(_model_params_from_t5x(params, self.dro.config), batch, dropout_rng)

  class KTOEncoderDecoderModel(_Adapter):
    """KTO under t5x: `dro_jax.models.KTOModel.loss_fn`, with the reference's
    log-probs from the frozen `reference` collection (initialised as the policy)."""

    _reference = True

    def __init__(self, config: network.T5Config, vocabulary, optimizer_def, *, beta: float = 0.1,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 desirable: str = "sign", logprob_normalization: str = "sum", **kwargs):
      super().__init__(models.KTOModel(config, beta=beta, desirable_weight=desirable_weight,
                                       undesirable_weight=undesirable_weight, desirable=desirable,
                                       logprob_normalization=logprob_normalization),
                       vocabulary, optimizer_def, **kwargs)

    def _kto_loss(self, params, batch, dropout_rng, flax_mutables):
      if not flax_mutables or "reference" not in flax_mutables:
        raise ValueError("KTOEncoderDecoderModel needs its 'reference' variables "
                         "(t5x passes them when get_initial_variables made them)")
      ref = jax.lax.stop_gradient(from_t5x_layout(flax_mutables["reference"], self.dro.config))
      batch = {**batch, **self.dro.reference_features(ref, batch)}
      return self._dro_loss({"policy": from_t5x_layout(params["policy"], self.dro.config), "value": {}},
                            batch, dropout_rng)

    def loss_fn(self, params, batch, dropout_rng, flax_mutables=None):
      loss, metrics = self._kto_loss(params, batch, dropout_rng, flax_mutables)
      return loss, (metrics, flax_mutables)

    def eval_fn(self, params, batch, flax_mutables=None):
      return self._kto_loss(params, batch, None, flax_mutables)

  return {"DROEncoderDecoderModel": DROEncoderDecoderModel,
          "KTOEncoderDecoderModel": KTOEncoderDecoderModel}


_CLASS_NAMES = ("DROEncoderDecoderModel", "KTOEncoderDecoderModel")


def __getattr__(name: str) -> Any:  # PEP 562: build the t5x classes on first use
  if name in _CLASS_NAMES:
    classes = _build_classes()
    globals().update(classes)
    return classes[name]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_CLASS_NAMES))


# ------------------------------------------------------- checkpoint for scoring
def load_t5x_params(t5x_checkpoint: str) -> dict:
  """The 'target' params of a t5x checkpoint dir (`.../checkpoint_N`), orbax or msgpack."""
  import os

  import numpy as np

  state_dir = os.path.join(t5x_checkpoint, "state")
  if os.path.isdir(state_dir):  # t5x's current (orbax) format
    from dro_jax import checkpoints
    # as host arrays: a bare restore warns that restoring without shardings is unsafe
    target = checkpoints._restore_tree(state_dir, only="target")["target"]  # pylint: disable=protected-access
  else:  # legacy msgpack/tensorstore
    _import_t5x()
    import t5x.checkpoints  # pylint: disable=g-import-not-at-top
    target = t5x.checkpoints.load_t5x_checkpoint(t5x_checkpoint)["target"]
  return jax.tree_util.tree_map(np.asarray, target)


def save_policy_as_dro_jax(t5x_checkpoint: str, output: str, config: network.T5Config, *,
                           vocabulary_path: Optional[str] = None, subtree: Optional[str] = None) -> None:
  """Writes the T5 in a t5x checkpoint as a dro_jax model checkpoint, so that
  `python -m dro_jax.score --checkpoint=OUTPUT` can compute `ref_logprobs`.

  subtree: None for a plain t5x T5 checkpoint, 'policy' for one of these models.
  """
  from dro_jax import checkpoints

  target = load_t5x_params(t5x_checkpoint)
  if subtree:
    target = target[subtree]
  checkpoints.save_model_checkpoint(output, config=config, params=from_t5x_layout(target, config),
                                    vocabulary_path=vocabulary_path)
