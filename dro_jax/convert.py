"""Convert between Hugging Face T5 directories and dro_jax checkpoints.

    python -m dro_jax.convert import --hf_dir=DIR --output=CKPT
    python -m dro_jax.convert export --checkpoint=CKPT --output=HF_DIR

`import` reads config.json + model.safetensors (+ spiece.model) and writes an orbax
checkpoint with its vocabulary; `export` writes a directory that
`transformers.T5ForConditionalGeneration.from_pretrained` loads. Both write into a new
or empty directory only (never over a checkpoint or a training run). Bad input: a one-line
error on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def _describe(config, params) -> str:
  import jax
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(params))
  # Named by what it is, not by the release it looks like: a tied gated-gelu model is not v1.0.
  style = f"{config.feed_forward_proj}, {'tied' if config.tie_word_embeddings else 'untied'}"
  return (f"T5 ({style}), {config.num_encoder_layers}+{config.num_decoder_layers} layers, "
          f"d_model {config.d_model}, vocab {config.vocab_size}, {n / 1e6:.1f}M params")


def _check_empty_output(output: str) -> None:
  """Both directions write into a new or empty directory: never over a checkpoint, a training run
  (its dro_jax_model.json and checkpoints/) or an HF directory."""
  if os.path.isdir(output) and os.listdir(output):
    raise ValueError(f"{output}: output directory is not empty")
  if os.path.exists(output) and not os.path.isdir(output):
    raise ValueError(f"{output}: exists and is not a directory")


def import_hf(hf_dir: str, output: str) -> str:
  from dro_jax import checkpoints, hf
  _check_empty_output(output)
  config, params = hf.load_hf_t5(hf_dir)  # validates everything before anything is written
  vocab = hf.vocabulary_path(hf_dir)
  checkpoints.save_model_checkpoint(output, config=config, params=params, vocabulary_path=vocab)
  note = "" if vocab else " (no spiece.model or ByT5 tokenizer_class: vocabulary not recorded)"
  return f"imported {_describe(config, params)} from {hf_dir} to {output}{note}"


def export_hf(checkpoint: str, output: str) -> str:
  from dro_jax import checkpoints, hf
  _check_empty_output(output)
  ckpt = checkpoints.load_model_checkpoint(checkpoint)
  vocab = ckpt.vocabulary_path
  byte = vocab == checkpoints.BYTE_VOCABULARY
  spiece = vocab if vocab is not None and not byte else None
  hf.export_hf_t5(output, ckpt.config, ckpt.params, spiece_model_path=spiece, byte_vocabulary=byte)
  note = " (byte vocabulary: config.json names ByT5Tokenizer)" if byte else (
      "" if spiece else " (no vocabulary recorded: no spiece.model written)")
  return f"exported {_describe(ckpt.config, ckpt.params)} from {checkpoint} to {output}{note}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m dro_jax.convert", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p_imp = sub.add_parser("import", help="HF T5 directory -> dro_jax checkpoint")
  p_imp.add_argument("--hf_dir", required=True)
  p_imp.add_argument("--output", required=True)
  p_exp = sub.add_parser("export", help="dro_jax checkpoint -> HF T5 directory")
  p_exp.add_argument("--checkpoint", required=True)
  p_exp.add_argument("--output", required=True)
  args = parser.parse_args(argv)
  try:
    if args.command == "import":
      msg = import_hf(args.hf_dir, args.output)
    else:
      msg = export_hf(args.checkpoint, args.output)
  except (ValueError, OSError, KeyError) as e:  # HFCheckpointError/CheckpointError are ValueErrors
    text = str(e).strip().splitlines()
    print(f"error: {text[0] if text else type(e).__name__}", file=sys.stderr)
    return 2
  print(msg)
  return 0


if __name__ == "__main__":
  sys.exit(main())
