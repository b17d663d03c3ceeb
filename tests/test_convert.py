"""python -m dro_jax.convert: HF dir -> dro_jax checkpoint -> HF dir, and its one-line errors."""
import contextlib
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("safetensors")

from dro_jax import checkpoints, convert, hf, network  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = network.T5Config(vocab_size=200, d_model=16, d_kv=4, d_ff=24, num_heads=2,
                       num_encoder_layers=1, num_decoder_layers=2,
                       relative_attention_num_buckets=8, relative_attention_max_distance=16)


def _random_params(config, seed=0):
  shapes = jax.eval_shape(lambda: network.T5(config).init(
      jax.random.PRNGKey(0), np.ones((1, 3), np.int32), np.ones((1, 3), np.int32)))
  rng = np.random.default_rng(seed)
  from flax import linen as nn
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                nn.unbox(shapes)["params"])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """An HF T5 directory (written by our exporter: no torch needed) with a spiece.model."""
  spm = pytest.importorskip("sentencepiece")
  root = tmp_path_factory.mktemp("convert")
  spm.SentencePieceTrainer.train(
      input=os.path.join(REPO, "tests", "data", "spm_corpus.txt"),
      model_prefix=str(root / "spiece"), vocab_size=200, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      minloglevel=2)
  path = str(root / "hf")
  params = _random_params(CFG)
  hf.export_hf_t5(path, CFG, params, spiece_model_path=str(root / "spiece.model"))
  return path, params


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dro_jax.convert", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_import_export_round_trip(hf_dir, tmp_path, capsys):
  path, params = hf_dir
  ckpt = str(tmp_path / "ckpt")
  assert convert.main(["import", f"--hf_dir={path}", f"--output={ckpt}"]) == 0
  # what was imported, named by its feed-forward and tying (a tied gated-gelu model is not "v1.0")
  tying = "tied" if CFG.tie_word_embeddings else "untied"
  assert f"imported T5 ({CFG.feed_forward_proj}, {tying}), " in capsys.readouterr().out
  loaded = checkpoints.load_model_checkpoint(ckpt)
  assert loaded.config == CFG
  assert os.path.basename(loaded.vocabulary_path) == "spiece.model"
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(loaded.params), params)
  # Every checkpoint consumer also takes the HF directory directly.
  direct = checkpoints.load_model_checkpoint(path)
  assert direct.config == CFG
  jax.tree_util.tree_map(np.testing.assert_array_equal, direct.params, params)

  out = str(tmp_path / "exported")
  assert convert.main(["export", f"--checkpoint={ckpt}", f"--output={out}"]) == 0
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "spiece.model"]
  mode = lambda name: os.stat(os.path.join(out, name)).st_mode & 0o777
  assert mode("model.safetensors") == mode("config.json")  # not safetensors' private 0600
  config2, params2 = hf.load_hf_t5(out)
  assert config2 == CFG
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_exported_dir_loads_in_transformers(hf_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  path, params = hf_dir
  model = transformers.T5ForConditionalGeneration.from_pretrained(path).eval()
  tok = transformers.T5Tokenizer.from_pretrained(path)
  enc = np.asarray([tok("The reward model gave a thumbs up.").input_ids])
  dec = np.asarray([[0, 5, 9, 11]])
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec)).logits.numpy()
  ours = jax.jit(network.T5(CFG).apply)({"params": params}, enc, dec)
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)


def test_cli_errors_are_one_line(hf_dir, tmp_path):
  path, _ = hf_dir
  (tmp_path / "not_t5").mkdir()
  (tmp_path / "not_t5" / "config.json").write_text('{"model_type": "bert"}')
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  cases = [
      (["import", f"--hf_dir={tmp_path / 'not_t5'}", f"--output={tmp_path / 'a'}"],
       "unsupported model_type 'bert'"),
      (["import", f"--hf_dir={tmp_path / 'missing'}", f"--output={tmp_path / 'b'}"],
       "not a directory"),
      (["export", f"--checkpoint={tmp_path / 'missing'}", f"--output={tmp_path / 'c'}"],
       "does not exist"),
      (["export", f"--checkpoint={path}", f"--output={tmp_path / 'full'}"], "not empty"),
  ]
  # One real subprocess: exit code 2, one "error:" line on stderr, no traceback.
  res = _run_cli(*cases[0][0])
  assert res.returncode == 2, res.stderr
  lines = [l for l in res.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and cases[0][1] in lines[0] and "Traceback" not in res.stderr
  for argv, expect in cases[1:]:  # the rest in-process (faster)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      assert convert.main(argv) == 2
    msg = err.getvalue().strip()
    assert len(msg.splitlines()) == 1 and msg.startswith("error:") and expect in msg, msg
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_byte_vocabulary_survives_export_import(tmp_path):
  config = CFG.replace(vocab_size=259)
  ckpt = str(tmp_path / "ckpt")
  checkpoints.save_model_checkpoint(ckpt, config=config, params=_random_params(config), vocabulary_path="byte")
  out, back = str(tmp_path / "hf"), str(tmp_path / "back")
  assert convert.main(["export", f"--checkpoint={ckpt}", f"--output={out}"]) == 0
  assert convert.main(["import", f"--hf_dir={out}", f"--output={back}"]) == 0
  assert checkpoints.load_model_checkpoint(back).vocabulary_path == "byte"
  assert hf.vocabulary_path(out) == "byte"
  assert checkpoints.load_model_checkpoint(out).vocabulary_path == "byte"  # the HF directory itself
  transformers = pytest.importorskip("transformers")
  import seqio
  text = "héllo, wörld"  # transformers' tokenizer for the exported directory has our ids
  assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == [
      *seqio.ByteVocabulary().encode(text), 1]


def test_import_refuses_a_non_empty_output_such_as_a_run(hf_dir, tmp_path):
  path, _ = hf_dir
  run = tmp_path / "run"
  (run / "checkpoints" / "10").mkdir(parents=True)
  (run / checkpoints.MODEL_JSON).write_text('{"network": {}}')
  (tmp_path / "a_file").write_text("x")
  for out, expect in ((run, f"{run}: output directory is not empty"),
                      (tmp_path / "a_file", f"{tmp_path / 'a_file'}: exists and is not a directory")):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      assert convert.main(["import", f"--hf_dir={path}", f"--output={out}"]) == 2
    msg = err.getvalue().strip()
    assert msg == f"error: {expect}", msg
  assert (run / checkpoints.MODEL_JSON).read_text() == '{"network": {}}'
  assert sorted(os.listdir(run)) == ["checkpoints", checkpoints.MODEL_JSON]
  empty = tmp_path / "empty"
  empty.mkdir()
  assert convert.main(["import", f"--hf_dir={path}", f"--output={empty}"]) == 0  # an empty folder is fine
