"""Hugging Face T5 checkpoints <-> `network.T5` params, without torch or pickle.

An HF T5 directory holds config.json, model.safetensors (or a sharded
model.safetensors.index.json) and usually spiece.model. Import validates everything
before returning (never a partial import); every problem is an `HFCheckpointError`
with a one-line message.

Name mapping (HF weight [out, in] -> ours; H heads, K d_kv, D d_model):
    shared.weight [V, D]                        -> token_embedder/embedding [V, D]
    {enc,dec}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [R, H]
                                                -> {stack}/relpos_bias/rel_embedding
    ...SelfAttention.{q,k,v}.weight [H*K, D]    -> .../{query,key,value}/kernel [D, H, K]
    ...SelfAttention.o.weight [D, H*K]          -> .../out/kernel [H, K, D]
    ...DenseReluDense.{wi,wi_0,wi_1}.weight [F, D], wo [D, F] -> mlp/*/kernel (transposed)
    ...layer_norm.weight, final_layer_norm.weight -> */scale
    lm_head.weight [V, D]                       -> lm_head/kernel [D, V] (untied only)
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from dro_jax import network

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SPIECE = "spiece.model"
# seqio.ByteVocabulary's ids (pad 0, eos 1, unk 2, byte + 3) are ByT5Tokenizer's: config.json's
# standard `tokenizer_class` records a byte vocabulary for transformers' AutoTokenizer and for us.
BYTE_TOKENIZER = "ByT5Tokenizer"
_ARCHITECTURES = ("T5ForConditionalGeneration", "MT5ForConditionalGeneration", "T5WithLMHeadModel")
_MODEL_TYPES = ("t5", "mt5")
# Present in some checkpoints but not used by T5ForConditionalGeneration (tied copies, or an
# unused cross-attention bias that old versions saved).
_IGNORED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
            "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")


class HFCheckpointError(ValueError):
  """A Hugging Face directory that cannot be imported or exported; one-line message."""


def _read_config(path: str) -> dict:
  cfg_path = os.path.join(path, CONFIG_JSON)
  if not os.path.isdir(path):
    raise HFCheckpointError(f"{path}: not a directory")
  if not os.path.isfile(cfg_path):
    raise HFCheckpointError(f"{path}: not a Hugging Face T5 directory (no {CONFIG_JSON})")
  try:
    with open(cfg_path) as f:
      cfg = json.load(f)
  except (OSError, ValueError) as e:
    raise HFCheckpointError(f"{cfg_path}: unreadable JSON ({str(e).splitlines()[0]})") from None
  if not isinstance(cfg, dict):
    raise HFCheckpointError(f"{cfg_path}: expected a JSON object")
  return cfg


def is_hf_t5_dir(path: str) -> bool:
  """True for a directory whose config.json names a T5 model (it may still be unsupported:
  `load_hf_t5` then says why)."""
  try:
    cfg = _read_config(path)
  except HFCheckpointError:
    return False
  archs = cfg.get("architectures") or []
  return ("t5" in str(cfg.get("model_type", "")).lower()
          or any("t5" in str(a).lower() for a in archs))


def vocabulary_path(path: str) -> str | None:
  """The vocabulary of an HF T5 directory: its spiece.model, "byte" (ByT5), or None if unknown."""
  spiece = os.path.join(path, SPIECE)
  if os.path.isfile(spiece):
    return spiece
  return "byte" if _read_config(path).get("tokenizer_class") == BYTE_TOKENIZER else None


def _config_from_hf(cfg: dict, where: str) -> tuple[network.T5Config, bool]:
  """-> (our config, whether HF scales decoder outputs by d_model**-0.5)."""
  model_type = cfg.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise HFCheckpointError(f"{where}: unsupported model_type {model_type!r} "
                            f"(supported: {', '.join(_MODEL_TYPES)})")
  archs = cfg.get("architectures") or []
  if archs and not any(a in _ARCHITECTURES for a in archs):
    raise HFCheckpointError(f"{where}: unsupported architecture {', '.join(map(str, archs))} "
                            f"(supported: {', '.join(_ARCHITECTURES)})")
  proj = cfg.get("feed_forward_proj", "relu")
  if proj not in ("relu", "gated-gelu"):
    raise HFCheckpointError(f"{where}: unsupported feed_forward_proj {proj!r} "
                            "(supported: relu, gated-gelu)")
  scale = _scales_decoder_output(cfg, model_type)
  pad = _int_id(cfg.get("pad_token_id"), 0)
  try:
    num_layers = cfg["num_layers"]
    config = network.T5Config(
        vocab_size=cfg["vocab_size"], d_model=cfg["d_model"], d_kv=cfg["d_kv"],
        d_ff=cfg["d_ff"], num_heads=cfg["num_heads"], num_encoder_layers=num_layers,
        num_decoder_layers=cfg.get("num_decoder_layers") or num_layers,
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
        dropout_rate=float(cfg.get("dropout_rate", 0.1)),
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=proj, tie_word_embeddings=bool(scale),
        pad_id=pad, eos_id=_int_id(cfg.get("eos_token_id"), 1),
        decoder_start_id=_int_id(cfg.get("decoder_start_token_id"), pad))
  except KeyError as e:
    raise HFCheckpointError(f"{where}: config.json lacks {e.args[0]!r}") from None
  except (ValueError, TypeError) as e:
    raise HFCheckpointError(f"{where}: bad config.json ({e})") from None
  return config, bool(scale)


def _scales_decoder_output(cfg: dict, model_type: str) -> bool:
  """Whether HF multiplies the decoder output by d_model**-0.5 before the lm_head.

  transformers 5 writes `scale_decoder_outputs` for T5 and always `tie_word_embeddings: true`;
  its mT5 never scales. transformers 4 scaled both exactly when `tie_word_embeddings` was set
  (default true for T5, false for mT5).
  """
  if "scale_decoder_outputs" in cfg:
    return bool(cfg["scale_decoder_outputs"])
  major = str(cfg.get("transformers_version", "4")).split(".")[0]
  if model_type == "mt5" and major.isdigit() and int(major) >= 5:
    return False
  return bool(cfg.get("tie_word_embeddings", model_type == "t5"))


def _int_id(value, default):
  """HF ids may be null or a list (several EOS ids): take the first, else the default."""
  if isinstance(value, list):
    value = value[0] if value else None
  return default if value is None else value


def _read_weights(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # optional dependency, needed only here
  single, index = os.path.join(path, WEIGHTS), os.path.join(path, WEIGHTS_INDEX)
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    try:
      with open(index) as f:
        files = sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise HFCheckpointError(f"{index}: unreadable index ({e})") from None
  else:
    other = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
             if os.path.exists(os.path.join(path, n))]
    hint = f" (found {', '.join(other)}; convert it to safetensors: pickle is never read)" if other else ""
    raise HFCheckpointError(f"{path}: no {WEIGHTS} or {WEIGHTS_INDEX}{hint}")
  weights = {}
  for file in files:
    try:
      weights.update(load_file(file))
    except Exception as e:  # safetensors raises several types for corrupt files
      raise HFCheckpointError(f"{file}: unreadable safetensors ({str(e).splitlines()[0]})") from None
  return weights


def _to_ours(kind: str, w: np.ndarray, h: int, k: int) -> np.ndarray:
  if kind == "qkv":    # [H*K, D] -> [D, H, K]
    return w.T.reshape(w.shape[1], h, k)
  if kind == "o":      # [D, H*K] -> [H, K, D]
    return w.T.reshape(h, k, w.shape[0])
  return w.T if kind == "t" else w


def _to_hf(kind: str, w: np.ndarray) -> np.ndarray:
  if kind == "qkv":
    return w.reshape(w.shape[0], -1).T
  if kind == "o":
    return w.reshape(-1, w.shape[-1]).T
  return w.T if kind == "t" else w


def _mapping(config: network.T5Config) -> list[tuple[str, tuple, tuple, str]]:
  """(hf name, our path, hf shape, transform kind) for every tensor but lm_head."""
  d, h, k, f = config.d_model, config.num_heads, config.d_kv, config.d_ff
  r = config.relative_attention_num_buckets
  t, same = "t", "same"
  rows = [("shared.weight", ("token_embedder", "embedding"), (config.vocab_size, d), same)]

  def attention(hf, ours):
    for a, b in (("q", "query"), ("k", "key"), ("v", "value")):
      rows.append((f"{hf}.{a}.weight", ours + (b, "kernel"), (h * k, d), "qkv"))
    rows.append((f"{hf}.o.weight", ours + ("out", "kernel"), (d, h * k), "o"))

  def mlp(hf, ours):
    wis = ("wi",) if config.feed_forward_proj == "relu" else ("wi_0", "wi_1")
    for wi in wis:
      rows.append((f"{hf}.DenseReluDense.{wi}.weight", ours + ("mlp", wi, "kernel"), (f, d), t))
    rows.append((f"{hf}.DenseReluDense.wo.weight", ours + ("mlp", "wo", "kernel"), (d, f), t))

  def norm(hf, ours):
    rows.append((f"{hf}.weight", ours + ("scale",), (d,), same))

  for stack, n in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
    rows.append((f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                 (stack, "relpos_bias", "rel_embedding"), (r, h), same))
    for i in range(n):
      hf, ours = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      if stack == "encoder":
        norm(f"{hf}.0.layer_norm", ours + ("pre_attention_layer_norm",))
        attention(f"{hf}.0.SelfAttention", ours + ("attention",))
        norm(f"{hf}.1.layer_norm", ours + ("pre_mlp_layer_norm",))
        mlp(f"{hf}.1", ours)
      else:
        norm(f"{hf}.0.layer_norm", ours + ("pre_self_attention_layer_norm",))
        attention(f"{hf}.0.SelfAttention", ours + ("self_attention",))
        norm(f"{hf}.1.layer_norm", ours + ("pre_cross_attention_layer_norm",))
        attention(f"{hf}.1.EncDecAttention", ours + ("encoder_decoder_attention",))
        norm(f"{hf}.2.layer_norm", ours + ("pre_mlp_layer_norm",))
        mlp(f"{hf}.2", ours)
    norm(f"{stack}.final_layer_norm", (stack, f"{stack}_norm"))
  return rows


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def load_hf_t5(path: str) -> tuple[network.T5Config, dict[str, Any]]:
  """Reads an HF T5 directory -> (T5Config, unboxed T5 'params' of float32 numpy arrays)."""
  path = os.path.abspath(os.path.expanduser(path))
  raw_config = _read_config(path)
  config, scale = _config_from_hf(raw_config, path)
  weights = _read_weights(path)
  if "shared.weight" not in weights and "encoder.embed_tokens.weight" in weights:
    weights["shared.weight"] = weights["encoder.embed_tokens.weight"]
  params: dict[str, Any] = {}
  used = set(_IGNORED)
  h, k = config.num_heads, config.d_kv
  for name, ours, shape, kind in _mapping(config):
    if name not in weights:
      raise HFCheckpointError(f"{path}: missing tensor {name}")
    w = weights[name]
    if tuple(w.shape) != shape:
      raise HFCheckpointError(f"{path}: tensor {name} has shape {tuple(w.shape)}, "
                              f"config.json implies {shape}")
    _set(params, ours, np.ascontiguousarray(_to_ours(kind, np.asarray(w, np.float32), h, k)))
    used.add(name)
  # Output projection: HF ties lm_head to shared unless the file holds a different lm_head.
  embedding = params["token_embedder"]["embedding"]
  lm = weights.get("lm_head.weight")
  used.add("lm_head.weight")
  if lm is None and raw_config.get("tie_word_embeddings") is False:
    # HF would start a random output layer (with a warning); a tied one would be another model.
    raise HFCheckpointError(f"{path}: config.json says tie_word_embeddings=false, but the weights have no "
                            "lm_head.weight (the output layer)")
  if lm is not None and tuple(lm.shape) != embedding.shape:
    raise HFCheckpointError(f"{path}: tensor lm_head.weight has shape {tuple(lm.shape)}, "
                            f"config.json implies {embedding.shape}")
  shared_head = lm is None or np.array_equal(np.asarray(lm, np.float32), embedding)
  if not (shared_head and scale):
    # Represent as untied; a d_model**-0.5 output scaling is folded into the kernel.
    kernel = (embedding if lm is None else np.asarray(lm, np.float32)).T
    if scale:
      kernel = kernel * np.float32(config.d_model ** -0.5)
    params["lm_head"] = {"kernel": np.ascontiguousarray(kernel, np.float32)}
    config = config.replace(tie_word_embeddings=False)
  unexpected = sorted(set(weights) - used)
  if unexpected:
    raise HFCheckpointError(f"{path}: unexpected tensor {unexpected[0]} "
                            f"({len(unexpected)} in all; does config.json match the weights?)")
  return config, params


def _hf_config(config: network.T5Config) -> dict:
  gated = config.feed_forward_proj.startswith("gated-")
  return {
      "architectures": ["T5ForConditionalGeneration"],
      "model_type": "t5",
      "vocab_size": config.vocab_size,
      "d_model": config.d_model,
      "d_kv": config.d_kv,
      "d_ff": config.d_ff,
      "num_heads": config.num_heads,
      "num_layers": config.num_encoder_layers,
      "num_decoder_layers": config.num_decoder_layers,
      "relative_attention_num_buckets": config.relative_attention_num_buckets,
      "relative_attention_max_distance": config.relative_attention_max_distance,
      "dropout_rate": config.dropout_rate,
      "layer_norm_epsilon": config.layer_norm_epsilon,
      "initializer_factor": 1.0,
      "feed_forward_proj": config.feed_forward_proj,
      "dense_act_fn": "gelu_new" if gated else "relu",
      "is_gated_act": gated,
      "tie_word_embeddings": bool(config.tie_word_embeddings),
      "is_encoder_decoder": True,
      "use_cache": True,
      "pad_token_id": config.pad_id,
      "eos_token_id": config.eos_id,
      "decoder_start_token_id": config.decoder_start_id,
      "torch_dtype": "float32",
  }


def export_hf_t5(out_dir: str, config: network.T5Config, params, *,
                 spiece_model_path: str | None = None, byte_vocabulary: bool = False) -> None:
  """Writes config.json, model.safetensors (float32) and spiece.model to `out_dir`.

  `byte_vocabulary` records seqio's ByteVocabulary as config.json's tokenizer_class ByT5Tokenizer.

  The result loads with `transformers.T5ForConditionalGeneration.from_pretrained(out_dir)`.
  All tensors are checked before anything is written.
  """
  from safetensors.numpy import save_file  # optional dependency, needed only here
  if spiece_model_path is not None and not os.path.isfile(spiece_model_path):
    raise HFCheckpointError(f"{spiece_model_path}: SentencePiece model not found")
  tensors: dict[str, np.ndarray] = {}
  h, k = config.num_heads, config.d_kv
  params = network.unstack_layers(params)  # a scan_layers=True checkpoint: HF is unrolled
  for name, ours, shape, kind in _mapping(config):
    try:
      value = np.asarray(_get(params, ours), np.float32)
    except (KeyError, TypeError, IndexError):
      raise HFCheckpointError(f"params lack {'/'.join(ours)} (needed for {name})") from None
    expect = _to_ours(kind, np.zeros(shape, np.float32), h, k).shape
    if value.shape != expect:
      raise HFCheckpointError(f"params {'/'.join(ours)} has shape {value.shape}, "
                              f"config implies {expect}")
    tensors[name] = np.ascontiguousarray(_to_hf(kind, value))
  if not config.tie_word_embeddings:
    try:
      kernel = np.asarray(params["lm_head"]["kernel"], np.float32)
    except (KeyError, TypeError):
      raise HFCheckpointError("params lack lm_head/kernel (config has untied embeddings)") from None
    if kernel.shape != (config.d_model, config.vocab_size):
      raise HFCheckpointError(f"params lm_head/kernel has shape {kernel.shape}, config implies "
                              f"{(config.d_model, config.vocab_size)}")
    tensors["lm_head.weight"] = np.ascontiguousarray(kernel.T)
  os.makedirs(out_dir, exist_ok=True)
  save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(os.path.join(out_dir, WEIGHTS), 0o666 & ~umask)  # safetensors writes 0600: readable like config.json
  hf_config = _hf_config(config)
  if byte_vocabulary:
    hf_config["tokenizer_class"] = BYTE_TOKENIZER
  with open(os.path.join(out_dir, CONFIG_JSON), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if spiece_model_path is not None:
    shutil.copyfile(spiece_model_path, os.path.join(out_dir, SPIECE))
