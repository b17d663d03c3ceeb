"""network.T5 / value networks: shapes, logical axes, masking, packing, remat, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from dro_jax import network
from tiny import random_params

TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2,
            num_decoder_layers=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=16)
AXES = {"batch", "length", "embed", "mlp", "heads", "kv", "vocab", "relpos_buckets"}


def _cfg(**kw):
  return network.T5Config(**{**TINY, **kw})


def _tokens(rng, shape, lengths, vocab=64):
  """Random tokens in [2, vocab) with row i padded (0) after lengths[i]."""
  toks = rng.integers(2, vocab, size=shape)
  toks[np.arange(shape[1])[None, :] >= np.asarray(lengths)[:, None]] = 0
  return jnp.asarray(toks, jnp.int32)


def _init(cfg, seed=0):
  """(model, boxed variables) without compiling model.init (slow on CPU): the boxed
  shapes come from eval_shape (logical axis names included), the values from numpy."""
  model = network.T5(cfg)
  enc = jnp.ones((2, 6), jnp.int32)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), enc, enc)
  return model, random_params(boxed, seed)


@pytest.fixture(scope="module")
def model_and_params():
  """v1.1 style (gated-gelu, untied); the v1.0 style is covered by the HF parity tests."""
  return _init(_cfg())


@pytest.fixture(scope="module")
def v10_model_and_params():
  return _init(_cfg(feed_forward_proj="relu", tie_word_embeddings=True))


def test_config_validation_is_one_line():
  for bad in [dict(d_model=0), dict(feed_forward_proj="swish"), dict(dtype="int8"),
              dict(remat_policy="sometimes"), dict(attention_impl="flash"),
              dict(attention_impl="cudnn"), dict(dropout_rate=1.0), dict(pad_id=64),
              dict(scan_unroll=0), dict(scan_unroll=True), dict(fused_projections="yes"),
              dict(freeze_relative_attention_bias=1), dict(cast_kernels_before_scan="no"),
              dict(cast_kernels_before_scan=True, scan_layers=False)]:
    with pytest.raises(ValueError) as e:
      _cfg(**bad)
    assert "\n" not in str(e.value) and "T5Config" in str(e.value)
  cfg = _cfg(dtype="bfloat16")
  assert network.T5Config.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown field"):
    network.T5Config.from_dict({**cfg.to_dict(), "bogus": 1})


@pytest.mark.parametrize("which", ["v11", "v10"])
def test_param_tree_and_logical_axes(which, request):
  model, variables = request.getfixturevalue(
      "model_and_params" if which == "v11" else "v10_model_and_params")
  cfg = model.config
  boxed = variables["params"]
  # Every parameter is logically partitioned with known axis names.
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert set(leaf.names) <= AXES and len(leaf.names) == leaf.value.ndim
    assert leaf.value.dtype == jnp.float32
  p = nn.unbox(boxed)
  top = {"token_embedder", "encoder", "decoder"} | ({"lm_head"} if not cfg.tie_word_embeddings else set())
  assert set(p) == top
  assert p["token_embedder"]["embedding"].shape == (cfg.vocab_size, cfg.d_model)
  assert p["encoder"]["relpos_bias"]["rel_embedding"].shape == (8, 4)
  att = p["encoder"]["layers_1"]["attention"]
  assert att["query"]["kernel"].shape == (32, 4, 8) and att["out"]["kernel"].shape == (4, 8, 32)
  mlp = p["decoder"]["layers_0"]["mlp"]
  expect = {"wi", "wo"} if cfg.feed_forward_proj == "relu" else {"wi_0", "wi_1", "wo"}
  assert set(mlp) == expect
  assert set(p["decoder"]["layers_1"]) == {
      "pre_self_attention_layer_norm", "self_attention", "pre_cross_attention_layer_norm",
      "encoder_decoder_attention", "pre_mlp_layer_norm", "mlp"}
  assert set(p["encoder"]) == {"relpos_bias", "layers_0", "layers_1", "encoder_norm"}


def test_forward_padding_and_output_embedding(model_and_params):
  model, variables = model_and_params
  params = nn.unbox(variables)["params"]
  rng = np.random.default_rng(0)
  enc = _tokens(rng, (3, 7), [7, 4, 2])
  dec = _tokens(rng, (3, 5), [5, 3, 1])
  apply = jax.jit(model.apply)
  logits = apply({"params": params}, enc, dec)
  assert logits.shape == (3, 5, 64) and logits.dtype == jnp.float32
  # Extra encoder/decoder padding changes nothing on real positions.
  enc2 = jnp.pad(enc, ((0, 0), (0, 3)))
  dec2 = jnp.pad(dec, ((0, 0), (0, 2)))
  logits2 = apply({"params": params}, enc2, dec2)
  np.testing.assert_allclose(logits2[:, :5], logits, atol=1e-5)
  # Turning a padded encoder position into a real token does change the output.
  poked = enc.at[1, 5].set(9)
  assert not np.allclose(apply({"params": params}, poked, dec)[1], logits[1], atol=1e-5)
  # logits == decode_hidden @ output_embedding
  hidden = jax.jit(lambda p, e, d: model.apply({"params": p}, model.apply(
      {"params": p}, e, method=network.T5.encode), e, d, method=network.T5.decode_hidden))(
          params, enc, dec)
  w = network.output_embedding(model.config, params)
  np.testing.assert_allclose(hidden @ w, logits, atol=1e-4, rtol=1e-5)


def test_packed_equals_separate(model_and_params):
  model, variables = model_and_params
  params = nn.unbox(variables)["params"]
  rng = np.random.default_rng(1)
  ea, eb = rng.integers(2, 64, 4), rng.integers(2, 64, 4)
  da, db = rng.integers(2, 64, 3), rng.integers(2, 64, 3)
  da[0] = db[0] = 0  # decoder start token (== pad id) inside a packed row
  enc = jnp.asarray([np.concatenate([ea, eb, [0]])], jnp.int32)
  dec = jnp.asarray([np.concatenate([da, db, [0]])], jnp.int32)
  enc_seg = jnp.asarray([[1] * 4 + [2] * 4 + [0]])
  dec_seg = jnp.asarray([[1] * 3 + [2] * 3 + [0]])
  apply = jax.jit(model.apply)
  packed = apply({"params": params}, enc, dec, encoder_segment_ids=enc_seg,
                 decoder_segment_ids=dec_seg)[0]
  sep_a = apply({"params": params}, jnp.asarray([ea]), jnp.asarray([da]))[0]
  sep_b = apply({"params": params}, jnp.asarray([eb]), jnp.asarray([db]))[0]
  np.testing.assert_allclose(packed[:3], sep_a, atol=1e-5)
  np.testing.assert_allclose(packed[3:6], sep_b, atol=1e-5)


def test_remat_dropout_and_bf16():
  cfg = _cfg(dropout_rate=0.1, num_encoder_layers=1, num_decoder_layers=1)
  rng = np.random.default_rng(2)
  enc, dec = _tokens(rng, (2, 6), [6, 3]), _tokens(rng, (2, 4), [4, 2])
  params = nn.unbox(_init(cfg, seed=1)[1])["params"]

  def loss_and_grad(c):
    f = lambda p: jnp.sum(network.T5(c).apply({"params": p}, enc, dec) ** 2)
    return jax.jit(jax.value_and_grad(f))(params)

  # Rematerialisation changes memory, not numbers. (Without dropout: each dropout site
  # costs seconds of threefry compilation on this CPU.)
  ref_loss, ref_grad = loss_and_grad(cfg)
  loss, grad = loss_and_grad(cfg.replace(remat_policy="dots_saveable"))
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         grad, ref_grad)
  # Dropout: active only when enabled, driven by the 'dropout' rng.
  drop = jax.jit(lambda p, r: network.T5(cfg).apply({"params": p}, enc, dec, enable_dropout=True,
                                                    rngs={"dropout": r}))
  logits32 = jax.jit(network.T5(cfg).apply)({"params": params}, enc, dec)
  d1, d2 = drop(params, jax.random.PRNGKey(3)), drop(params, jax.random.PRNGKey(4))
  assert float(jnp.max(jnp.abs(d1 - logits32))) > 1e-3 and float(jnp.max(jnp.abs(d1 - d2))) > 1e-3
  np.testing.assert_array_equal(d1, drop(params, jax.random.PRNGKey(3)))
  logits16 = jax.jit(network.T5(cfg.replace(dtype="bfloat16")).apply)({"params": params}, enc, dec)
  assert logits16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.1 * float(jnp.max(jnp.abs(logits32)))


def test_relative_position_buckets():
  rel = jnp.arange(-300, 301)
  b = network.relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
  assert int(b.min()) == 0 and int(b.max()) == 31
  assert int(b[300]) == 0 and int(b[301]) == 17 and int(b[299]) == 1  # 0, +1, -1
  c = network.relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
  assert np.all(np.asarray(c[300:]) == 0) and int(c[299]) == 1 and int(c[0]) == 31


def test_value_networks(model_and_params):
  model, variables = model_and_params
  cfg = model.config
  policy = nn.unbox(variables)["params"]
  rng = np.random.default_rng(3)
  enc = _tokens(rng, (3, 6), [6, 2, 4])
  vnet = network.ValueNetwork(cfg)
  shapes = jax.eval_shape(vnet.init, jax.random.PRNGKey(5), enc)["params"]
  vparams = {k: jax.tree_util.tree_map(lambda x: jnp.full(x.shape, 0.5), nn.unbox(v))
             for k, v in shapes.items()}
  # The head's real initialiser (cheap to run alone) gives zeros, so V starts at 0.
  vparams["value_head"] = nn.unbox(network.ValueHead().init(
      jax.random.PRNGKey(5), jnp.ones((1, cfg.d_model))))["params"]
  assert set(vparams) == {"token_embedder", "encoder", "value_head"}
  assert jax.tree_util.tree_structure(vparams["encoder"]) == jax.tree_util.tree_structure(
      policy["encoder"])
  vapply = jax.jit(vnet.apply, static_argnames="num_segments")
  values = vapply({"params": vparams}, enc)
  assert values.shape == (3,) and values.dtype == jnp.float32
  np.testing.assert_array_equal(values, 0.0)  # zero-initialised head
  copied = network.init_value_from_policy(vparams, policy)
  np.testing.assert_array_equal(copied["encoder"]["encoder_norm"]["scale"],
                                policy["encoder"]["encoder_norm"]["scale"])
  np.testing.assert_array_equal(copied["token_embedder"]["embedding"],
                                policy["token_embedder"]["embedding"])
  # A non-zero head: value == head(mean over real tokens of the policy's encoding).
  head = {"kernel": jnp.asarray(rng.normal(size=cfg.d_model), jnp.float32), "bias": jnp.float32(0.5)}
  copied["value_head"] = head
  values = vapply({"params": copied}, enc)
  encoded = jax.jit(lambda p, e: model.apply({"params": p}, e, method=network.T5.encode))(
      policy, enc)
  mask = (enc != 0)[..., None]
  pooled = jnp.sum(encoded * mask, 1) / jnp.sum(mask, 1)
  np.testing.assert_allclose(values, pooled @ head["kernel"] + 0.5, rtol=1e-5, atol=1e-5)
  # The shared-encoder head gives the same numbers on the policy's encoding.
  shared = network.SharedEncoderValueHead()
  np.testing.assert_allclose(jax.jit(shared.apply)({"params": {"value_head": head}}, encoded,
                                                  enc != 0),
                             values, rtol=1e-5, atol=1e-5)
  # Per-segment values: segment k (id k+1) of a packed row equals its separate value.
  packed = jnp.concatenate([enc[:1, :6], enc[1:2, :2], jnp.zeros((1, 1), jnp.int32)], axis=1)
  seg = jnp.asarray([[1] * 6 + [2] * 2 + [0]])
  per_seg = vapply({"params": copied}, packed, encoder_segment_ids=seg, num_segments=3)
  assert per_seg.shape == (1, 3)
  np.testing.assert_allclose(per_seg[0, :2], values[:2], rtol=1e-4, atol=1e-5)
  scalar = network.ScalarValue()
  sv = scalar.init(jax.random.PRNGKey(0), enc)
  assert scalar.apply(sv, enc).shape == (3,)
  assert scalar.apply(sv, enc, num_segments=2).shape == (3, 2)
  with pytest.raises(ValueError, match="init_value_from_policy"):
    network.init_value_from_policy(vparams, {"token_embedder": policy["token_embedder"]})


@pytest.mark.parametrize("size,d_model,d_ff,heads,layers", [
    ("tiny", 64, 128, 4, 2), ("small", 512, 1024, 6, 8), ("base", 768, 2048, 12, 12),
    ("large", 1024, 2816, 16, 24), ("xl", 2048, 5120, 32, 24), ("xxl", 4096, 10240, 64, 24)])
def test_gin_model_sizes(size, d_model, d_ff, heads, layers):
  import os
  gin = pytest.importorskip("gin")
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "gin_configs", "models",
                      f"{size}.gin")
  gin.clear_config()
  try:
    gin.parse_config_file(path)
    cfg = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert isinstance(cfg, network.T5Config)
  assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_encoder_layers, cfg.num_decoder_layers,
          cfg.feed_forward_proj, cfg.tie_word_embeddings) == (
              d_model, d_ff, heads, layers, layers, "gated-gelu", False)
  assert cfg.d_kv == (16 if size == "tiny" else 64)
  assert cfg.vocab_size == (384 if size == "tiny" else 32128)


ATTENTION_SAVEABLE = "dots_with_no_batch_dims_and_attention_saveable"


@pytest.mark.parametrize("size,overlay,remat,frozen", [
    ("large", "gpu.gin", "dots_with_no_batch_dims_saveable", False),
    ("xl", "gpu.gin", "dots_with_no_batch_dims_saveable", False),
    # gpu.gin (included from any working directory) plus attention's saved forward outputs
    ("large", "gpu_large.gin", ATTENTION_SAVEABLE, False),
    # two levels of includes
    ("large", "gpu_large_frozen_bias.gin", ATTENTION_SAVEABLE, True),
])
def test_gpu_perf_overlays_keep_the_size_and_set_the_measured_step(size, overlay, remat, frozen):
  gin = pytest.importorskip("gin")
  from dro_jax import gin_utils
  gin.clear_config()
  try:
    gin_utils.parse([f"gin_configs/models/{size}.gin", f"gin_configs/perf/{overlay}"], [])
    cfg = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
  finally:
    gin.clear_config()
  assert (cfg.scan_layers, cfg.remat_policy, cfg.attention_impl, cfg.dtype) == (
      True, remat, "cudnn", "bfloat16")
  assert cfg.freeze_relative_attention_bias is frozen
  assert cfg.d_model == {"large": 1024, "xl": 2048}[size]


def test_frozen_bias_cudnn_backward_skips_the_bias_gradient(monkeypatch):
  """With freeze_relative_attention_bias, cuDNN's backward is asked for no bias gradient
  (variadic_args (has_bias, has_dbias) of JAX's real cuDNN primitives, traced on CPU with the
  cuDNN version check stubbed; nothing is compiled or run). Cross-attention carries no bias."""
  from dro_jax import flops
  from jax._src.cudnn import fused_attention_stablehlo as fused
  monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
  original = fused._dot_product_attention
  rng = np.random.default_rng(0)
  enc, dec = _tokens(rng, (2, 8), [8, 5]), _tokens(rng, (2, 6), [6, 3])
  seen = {}
  for frozen in (False, True):
    cfg = _cfg(dtype="bfloat16", attention_impl="cudnn", freeze_relative_attention_bias=frozen)
    model, variables = _init(cfg)
    params = nn.unbox(variables)["params"]
    loss = lambda p: model.apply({"params": p}, enc, dec).astype(jnp.float32).sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    bwd = flops.find_equations(jaxpr, lambda name: name.startswith("dot_product_attention_bwd"))
    assert len(bwd) == 6  # 2 encoder + 2 decoder self-attention, 2 cross-attention
    seen[frozen] = sorted(tuple(e.params["variadic_args"]) for e in bwd)
  assert seen[False] == [(False, False)] * 2 + [(True, True)] * 4
  assert seen[True] == [(False, False)] * 2 + [(True, False)] * 4
  assert fused._dot_product_attention is original  # restored after tracing


def test_frozen_bias_hook_binds_variadic_args_by_name_where_jax_moved_it(monkeypatch, caplog):
  """The hook patches the module that jax.nn.dot_product_attention really calls, finds
  `variadic_args` by name wherever it sits (0.12 moved it), restores the module, and warns,
  changing nothing, where a JAX has no such argument."""
  import types
  from jax._src.nn import functions as nn_functions
  moved = types.ModuleType("moved_cudnn_attention")
  exec("def _dot_product_attention(q, bias, extra, variadic_args, mask_type):\n"
       "  return variadic_args, extra, mask_type\n"
       "def attention(q, bias):\n"
       "  return _dot_product_attention(q, bias, 'x', (True, True, 7), 'causal')\n", vars(moved))
  monkeypatch.setattr(nn_functions, "cudnn_dot_product_attention", moved.attention)
  original = moved._dot_product_attention
  with network._cudnn_without_bias_grad():
    assert moved.attention(0, 1) == ((True, False, 7), "x", "causal")  # later flags kept
  assert moved._dot_product_attention is original
  assert moved.attention(0, 1) == ((True, True, 7), "x", "causal")

  exec("def _dot_product_attention(q, bias, flags):\n  return flags\n"
       "def attention(q, bias):\n  return _dot_product_attention(q, bias, (True, True))\n",
       vars(moved))
  monkeypatch.setattr(nn_functions, "cudnn_dot_product_attention", moved.attention)
  network._warn_once.cache_clear()
  with caplog.at_level("WARNING", logger="dro_jax.network"):
    with network._cudnn_without_bias_grad():
      assert moved.attention(0, 1) == (True, True)
  assert "still computes its gradient" in caplog.text


@pytest.mark.parametrize("packed", [False, True])
def test_cudnn_attention_path_layout(monkeypatch, packed):
  """The cudnn branch (GPU only) passes q/k/v, the [1, H, T, S] bias, key lengths and the
  causal flag (unpacked) or a folded mask (packed) in jax.nn.dot_product_attention's layout:
  run it on CPU with implementation='xla' and compare outputs and gradients with the einsum
  path. An all-padding row must stay finite."""
  real = jax.nn.dot_product_attention
  seen = []

  def xla_attention(*a, **kw):
    seen.append((kw.get("is_causal"), kw.get("key_value_seq_lengths") is not None))
    return real(*a, **{**kw, "implementation": "xla"})

  monkeypatch.setattr(jax.nn, "dot_product_attention", xla_attention)
  cfg = _cfg(dtype="bfloat16", num_encoder_layers=1, num_decoder_layers=1)
  params = nn.unbox(_init(cfg, seed=4)[1])["params"]
  rng = np.random.default_rng(4)
  if packed:
    enc, dec = _tokens(rng, (2, 6), [6, 3]), _tokens(rng, (2, 5), [5, 2])
    kw = dict(encoder_segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0]]),
              decoder_segment_ids=jnp.asarray([[1, 1, 2, 2, 2], [1, 1, 0, 0, 0]]))
    valid = np.asarray(kw["decoder_segment_ids"] > 0)
  else:
    enc, dec = _tokens(rng, (3, 6), [6, 3, 0]), _tokens(rng, (3, 5), [5, 2, 0])
    kw = {}
    valid = np.asarray(dec > 0)

  def loss(p, impl):
    logits = network.T5(cfg.replace(attention_impl=impl)).apply({"params": p}, enc, dec, **kw)
    return jnp.sum(jnp.where(valid[..., None], logits.astype(jnp.float32), 0.0)), logits

  (_, xla), g_xla = jax.jit(jax.value_and_grad(lambda p: loss(p, "xla"), has_aux=True))(params)
  (_, cudnn), g_cudnn = jax.jit(jax.value_and_grad(lambda p: loss(p, "cudnn"), has_aux=True))(
      params)
  # Unpacked: every attention call carries lengths or the causal flag (no mask tensor).
  expected = {(False, True), (True, False)} if not packed else {(False, False)}
  assert set(seen) == expected
  assert np.isfinite(np.asarray(cudnn, np.float32)).all()
  np.testing.assert_allclose(np.asarray(cudnn, np.float32)[valid],
                             np.asarray(xla, np.float32)[valid], atol=0.05, rtol=0.05)
  for path, a in jax.tree_util.tree_leaves_with_path(g_xla):
    b = _get(g_cudnn, path)
    scale = float(np.abs(np.asarray(a, np.float32)).max()) + 1e-6
    np.testing.assert_allclose(np.asarray(b, np.float32) / scale,
                               np.asarray(a, np.float32) / scale, atol=0.05,
                               err_msg=jax.tree_util.keystr(path))


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cudnn_folded_mask_is_finite_in_the_compute_dtype(monkeypatch, dtype):
  """A packed mask is folded into the bias that cuDNN gets in the compute dtype; -1e10 is -inf
  in float16, and a fully masked (padding) row of -inf gives NaN."""
  seen = {}
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda q, k, v, bias=None, **kw: seen.setdefault("bias", bias))
  q = jnp.zeros((1, 3, 2, 4), dtype)
  mask = jnp.asarray([[True, True, False], [True, True, False], [False, False, False]])[None, None]
  network._cudnn_attention(q, q, q, jnp.zeros((1, 2, 3, 3)), mask, causal=False, kv_lengths=None)
  bias = np.asarray(seen["bias"], np.float32)
  assert seen["bias"].dtype == jnp.dtype(dtype) and np.isfinite(bias).all()
  assert (bias[..., ~np.asarray(mask[0, 0])] < -1e4).all() and (bias[..., np.asarray(mask[0, 0])] == 0).all()


def test_cudnn_config_trains_with_attention_dropout(monkeypatch):
  """cuDNN's kernel has no attention dropout: with dropout on, attention_impl='cudnn' takes the
  XLA path (the same numbers as 'xla'), and uses cuDNN only without dropout."""
  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **kw: calls.append(1) or real(*a, **{**kw, "implementation": "xla"}))
  cfg = _cfg(dtype="bfloat16", dropout_rate=0.2, num_encoder_layers=1, num_decoder_layers=1)
  params = nn.unbox(_init(cfg, seed=5)[1])["params"]
  rng = np.random.default_rng(5)
  enc, dec = _tokens(rng, (2, 6), [6, 3]), _tokens(rng, (2, 4), [4, 2])
  run = lambda impl, drop: network.T5(cfg.replace(attention_impl=impl)).apply(
      {"params": params}, enc, dec, enable_dropout=drop, rngs={"dropout": jax.random.PRNGKey(1)})
  trained = run("cudnn", True)
  assert not calls
  np.testing.assert_array_equal(np.asarray(trained), np.asarray(run("xla", True)))
  run("cudnn", False)
  assert calls
