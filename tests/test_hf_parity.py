"""Our T5 against HF transformers' PyTorch T5 (random tiny models saved to disk and imported)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from dro_jax import decoding, hf, network  # noqa: E402

VOCAB = 96
STYLES = {
    # v1.0: ReLU, lm_head tied to the embedding, decoder output scaled by d_model**-0.5.
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # v1.1 / Flan-T5: gated GELU, separate lm_head, no scaling.
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def _make_hf_model(style: str, seed: int = 0):
  cfg = transformers.T5Config(
      vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
      num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12,
      dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
      **STYLES[style])
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(cfg)
  with torch.no_grad():
    # Random layer-norm scales and relative biases too, so every tensor matters.
    for name, p in model.named_parameters():
      if "layer_norm" in name or "relative_attention_bias" in name:
        p.add_(0.3 * torch.randn_like(p))
      elif style == "v1.0" and name.endswith(".weight") and "shared" not in name:
        p.mul_(3.0)  # else the random ReLU model greedily repeats one token from the start
    if style == "v1.1" and model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr():
      # transformers>=5 always ties at construction; untie by hand for a real v1.1 model.
      model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 32 ** -0.5)
  return model.eval()


@pytest.fixture(scope="module", params=list(STYLES))
def hf_dir(request, tmp_path_factory):
  """(style, directory, in-memory HF model) with the model saved as safetensors."""
  model = _make_hf_model(request.param)
  path = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
  model.save_pretrained(path, safe_serialization=True)
  assert os.path.isfile(os.path.join(path, "model.safetensors"))
  return request.param, path, model


@pytest.fixture(scope="module")
def imported(hf_dir):
  _, path, _ = hf_dir
  config, params = hf.load_hf_t5(path)
  return config, jax.tree_util.tree_map(jnp.asarray, params)


def _batch(seed, b=3, s=14, t=10):
  """Random batch with right padding in encoder and decoder; row lengths differ."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, VOCAB, size=(b, s))
  labels = rng.integers(2, VOCAB, size=(b, t))
  enc_len, dec_len = [s, s // 2, 3][:b], [t, t // 2, 2][:b]
  for i in range(b):
    enc[i, enc_len[i]:] = 0
    labels[i, dec_len[i] - 1] = 1          # EOS
    labels[i, dec_len[i]:] = 0
  dec_in = np.concatenate([np.zeros((b, 1), np.int64), labels[:, :-1]], axis=1)
  return enc, labels, dec_in


def _hf_logits(model, enc, dec_in, labels):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                decoder_input_ids=torch.tensor(dec_in),
                decoder_attention_mask=torch.tensor(labels != 0))
  return out.logits.numpy()


def _token_logprobs(logits, labels):
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return np.asarray(jnp.take_along_axis(logp, jnp.asarray(labels)[..., None], axis=-1)[..., 0])


def test_config_import(hf_dir, imported):
  style, _, model = hf_dir
  config, params = imported
  assert config.feed_forward_proj == STYLES[style]["feed_forward_proj"]
  assert config.tie_word_embeddings == (style == "v1.0")
  assert ("lm_head" in params) == (style == "v1.1")
  assert (config.num_encoder_layers, config.num_decoder_layers) == (2, 3)
  assert config.dropout_rate == pytest.approx(0.1)
  assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (8, 12)


@pytest.mark.parametrize("seed", [0, 1])
def test_token_logprobs_match_hf(hf_dir, imported, seed):
  _, _, model = hf_dir
  config, params = imported
  enc, labels, dec_in = _batch(seed)
  ours = jax.jit(network.T5(config).apply)({"params": params}, jnp.asarray(enc),
                                            jnp.asarray(dec_in))
  theirs = _hf_logits(model, enc, dec_in, labels)
  mask = labels != 0
  np.testing.assert_allclose(_token_logprobs(ours, labels)[mask],
                             _token_logprobs(theirs, labels)[mask], atol=1e-4, rtol=0)
  assert np.abs(_token_logprobs(theirs, labels)[mask]).max() > 1.0  # not a trivial model


def test_relative_position_buckets_match_hf():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  rel = np.arange(-400, 401)
  for bidirectional in (True, False):
    for buckets, max_dist in ((32, 128), (8, 12), (64, 256)):
      theirs = bucket(torch.tensor(rel), bidirectional=bidirectional, num_buckets=buckets,
                      max_distance=max_dist).numpy()
      ours = network.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                              num_buckets=buckets, max_distance=max_dist)
      np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_export_then_hf_loads_identical(hf_dir, imported, tmp_path):
  style, path, model = hf_dir
  config, params = imported
  out = str(tmp_path / "exported")
  hf.export_hf_t5(out, config, params)
  with open(os.path.join(out, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["architectures"] == ["T5ForConditionalGeneration"]
  assert cfg["tie_word_embeddings"] == (style == "v1.0")
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  enc, labels, dec_in = _batch(2)
  np.testing.assert_allclose(_hf_logits(reloaded, enc, dec_in, labels),
                             _hf_logits(model, enc, dec_in, labels), atol=1e-6, rtol=0)
  # And a second import gives back exactly the same params.
  config2, params2 = hf.load_hf_t5(out)
  assert config2 == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, jax.device_get(params))


def _t5x_names_of_hf_weights(n_enc: int, n_dec: int, gated: bool, tied: bool) -> dict[str, str]:
  """t5x's parameter name for each HF T5 weight, as transformers' t5x-to-PyTorch converter
  (models/t5/convert_t5x_checkpoint_to_pytorch.py) pairs them: every matrix is the transpose.
  A tied head (v1.0) is the embedding and has no name of its own."""
  names = {"shared.weight": "token_embedder/embedding",
           "encoder.final_layer_norm.weight": "encoder/encoder_norm/scale",
           "decoder.final_layer_norm.weight": "decoder/decoder_norm/scale"}
  if not tied:
    names["lm_head.weight"] = "decoder/logits_dense/kernel"
  for stack in ("encoder", "decoder"):
    names[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = f"{stack}/relpos_bias/rel_embedding"
  blocks = {"encoder": [("SelfAttention", "attention", "pre_attention_layer_norm")],
            "decoder": [("SelfAttention", "self_attention", "pre_self_attention_layer_norm"),
                        ("EncDecAttention", "encoder_decoder_attention", "pre_cross_attention_layer_norm")]}
  for stack, n in (("encoder", n_enc), ("decoder", n_dec)):
    for i in range(n):
      hf, t5x = f"{stack}.block.{i}.layer", f"{stack}/layers_{i}"
      for j, (theirs, ours, norm) in enumerate(blocks[stack]):
        names[f"{hf}.{j}.layer_norm.weight"] = f"{t5x}/{norm}/scale"
        for proj, name in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out")):
          names[f"{hf}.{j}.{theirs}.{proj}.weight"] = f"{t5x}/{ours}/{name}/kernel"
      mlp = len(blocks[stack])
      names[f"{hf}.{mlp}.layer_norm.weight"] = f"{t5x}/pre_mlp_layer_norm/scale"
      for w in ("wi_0", "wi_1", "wo") if gated else ("wi", "wo"):
        names[f"{hf}.{mlp}.DenseReluDense.{w}.weight"] = f"{t5x}/mlp/{w}/kernel"
  return names


def test_t5x_layout_is_the_one_transformers_converts_from(hf_dir, imported):
  """`t5x_models.to_t5x_layout` of the imported HF model equals t5x's checkpoint layout as
  transformers reads it: [embed, heads * d_kv] query/key/value kernels (head-major), the bias
  table as [heads, buckets], an untied lm_head as `logits_dense` (no t5x needed: CI has none)."""
  _, _, model = hf_dir
  from flax import traverse_util

  from dro_jax import t5x_models

  ours = {"/".join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(t5x_models.to_t5x_layout(imported[1])).items()}
  cfg = model.config
  tied = cfg.tie_word_embeddings
  weights = {k: v.detach().numpy() for k, v in model.state_dict().items()
             if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
             and not (tied and k == "lm_head.weight")}
  names = _t5x_names_of_hf_weights(cfg.num_layers, cfg.num_decoder_layers, cfg.is_gated_act, tied)
  if tied:  # the importer may fold v1.0's scaled, tied head into a kernel: the log-prob tests check it
    ours.pop("decoder/logits_dense/kernel", None)
  assert sorted(names) == sorted(weights) and sorted(names.values()) == sorted(ours)
  for hf_name, t5x_name in names.items():
    w = weights[hf_name]
    expected = w if t5x_name.endswith(("/scale", "token_embedder/embedding")) else w.T
    np.testing.assert_array_equal(ours[t5x_name], expected, err_msg=f"{t5x_name} (HF {hf_name})")


def test_greedy_decoding_matches_hf_generate(hf_dir, imported):
  _, _, model = hf_dir
  config, params = imported
  enc, _, _ = _batch(3, b=3, s=9)
  max_len = 12
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc != 0),
                            do_sample=False, num_beams=1, max_new_tokens=max_len,
                            min_new_tokens=0, use_cache=False,  # HF cache: num_layers only
                            suppress_tokens=[config.pad_id],  # ours never generates padding
                            ).numpy()[:, 1:]  # drop the start token
  theirs = np.pad(theirs, ((0, 0), (0, max_len - theirs.shape[1])))
  assert len(np.unique(theirs)) >= 4  # a non-degenerate continuation
  ours = decoding.generate(network.T5(config), params, jnp.asarray(enc), max_length=max_len)
  np.testing.assert_array_equal(np.asarray(ours), theirs)


def _write_dir(tmp_path, config=None, weights=None):
  from safetensors.numpy import save_file
  tmp_path.mkdir(parents=True, exist_ok=True)
  if config is not None:
    (tmp_path / "config.json").write_text(json.dumps(config))
  if weights is not None:
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  return str(tmp_path)


def test_bad_inputs_are_one_line_errors(hf_dir, tmp_path):
  from safetensors.numpy import load_file
  _, path, _ = hf_dir
  with open(os.path.join(path, "config.json")) as f:
    good_cfg = json.load(f)
  good_w = load_file(os.path.join(path, "model.safetensors"))
  name = "encoder.block.1.layer.0.SelfAttention.q.weight"
  bad_w = dict(good_w, **{name: good_w[name][:, :-1]})
  missing_w = {k: v for k, v in good_w.items() if k != name}
  cases = {
      "no config.json": (_write_dir(tmp_path / "empty"), "no config.json"),
      "bert": (_write_dir(tmp_path / "bert", {"model_type": "bert"}, good_w), "model_type 'bert'"),
      "encoder only": (_write_dir(tmp_path / "enc", dict(good_cfg, architectures=["T5EncoderModel"]),
                                  good_w), "unsupported architecture T5EncoderModel"),
      "activation": (_write_dir(tmp_path / "act", dict(good_cfg, feed_forward_proj="gated-silu"),
                                good_w), "feed_forward_proj 'gated-silu'"),
      "no weights": (_write_dir(tmp_path / "now", good_cfg), "no model.safetensors"),
      "shape": (_write_dir(tmp_path / "shape", good_cfg, bad_w), name),
      "missing": (_write_dir(tmp_path / "miss", good_cfg, missing_w), f"missing tensor {name}"),
      "layers": (_write_dir(tmp_path / "layers", dict(good_cfg, num_layers=1), good_w),
                 "unexpected tensor encoder.block.1"),
      "corrupt": (_write_dir(tmp_path / "corrupt", good_cfg), "unreadable safetensors"),
      "untied, no lm_head": (_write_dir(tmp_path / "nohead", dict(good_cfg, tie_word_embeddings=False),
                                        {k: v for k, v in good_w.items() if k != "lm_head.weight"}),
                             "tie_word_embeddings=false, but the weights have no lm_head.weight"),
  }
  (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"\x00garbage")
  for label, (bad_dir, expect) in cases.items():
    with pytest.raises(hf.HFCheckpointError) as e:
      hf.load_hf_t5(bad_dir)
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, (label, msg)
  assert not hf.is_hf_t5_dir(str(tmp_path / "empty"))
  assert not hf.is_hf_t5_dir(str(tmp_path / "bert"))
  assert hf.is_hf_t5_dir(path)
  # Export refuses params that do not match the config, before writing anything.
  config, params = hf.load_hf_t5(path)
  wrong = config.replace(d_ff=config.d_ff + 1)
  with pytest.raises(hf.HFCheckpointError, match="config implies") as e:
    hf.export_hf_t5(str(tmp_path / "out"), wrong, params)
  assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_mt5_saved_by_this_transformers_matches(tmp_path):
  # transformers 5 writes `tie_word_embeddings: true` for every mT5 but never scales its
  # decoder output; transformers 4 read that flag as "scale".
  cfg = transformers.MT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                               relative_attention_num_buckets=8, decoder_start_token_id=0)
  torch.manual_seed(0)
  model = transformers.MT5ForConditionalGeneration(cfg).eval()
  model.save_pretrained(str(tmp_path), safe_serialization=True)
  model = transformers.MT5ForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
  config, params = hf.load_hf_t5(str(tmp_path))
  enc, labels, dec_in = _batch(0)
  ours = network.T5(config).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec_in))
  theirs = _hf_logits(model, enc, dec_in, labels)
  mask = labels != 0
  np.testing.assert_allclose(_token_logprobs(ours, labels)[mask], _token_logprobs(theirs, labels)[mask],
                             atol=1e-4, rtol=0)
