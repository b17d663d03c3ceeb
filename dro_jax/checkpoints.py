"""Model checkpoints: one place that knows every format a checkpoint path may hold.

A path given to train/score/infer/evaluate/convert may be
  * a dro_jax model checkpoint (`save_model_checkpoint`): `dro_jax_model.json` + `params/`;
  * a training run directory (MODEL_DIR) or one of its `checkpoints/<step>` folders;
  * a Hugging Face T5 directory (config.json + model.safetensors [+ spiece.model]).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from dro_jax import io_utils

MODEL_JSON = "dro_jax_model.json"
BYTE_VOCABULARY = "byte"


class CheckpointError(ValueError):
    """A checkpoint path that cannot be read; the message is one line."""


@dataclasses.dataclass
class ModelCheckpoint:
    config: Any  # network.T5Config
    params: Any  # policy params (the T5 'params' collection, unboxed)
    vocabulary_path: str | None  # spiece.model path, "byte", or None if unknown
    value_params: Any = None  # value-network params, when the checkpoint has them
    step: int | None = None


def _write_model_json(path: str, config, vocabulary: str | None, extra: dict | None = None) -> None:
    meta = {"format": "dro_jax", "network": config.to_dict(), "vocabulary": vocabulary}
    meta.update(extra or {})
    with open(os.path.join(path, MODEL_JSON), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def _store_vocabulary(path: str, vocabulary_path: str | None) -> str | None:
    """Copies a spiece.model next to the checkpoint; returns the name to record."""
    if vocabulary_path in (None, BYTE_VOCABULARY):
        return vocabulary_path
    if not os.path.isfile(vocabulary_path):
        raise CheckpointError(f"{vocabulary_path}: vocabulary file not found")
    shutil.copyfile(vocabulary_path, os.path.join(path, "spiece.model"))
    return "spiece.model"


def write_run_metadata(model_dir: str, *, config, vocabulary_path: str | None, extra: dict | None = None) -> None:
    """Records the network config and vocabulary of a training run in MODEL_DIR."""
    os.makedirs(model_dir, exist_ok=True)
    vocab = _store_vocabulary(model_dir, vocabulary_path)
    _write_model_json(model_dir, config, vocab, extra)


def save_model_checkpoint(path: str, *, config, params, vocabulary_path: str | None = None, value_params=None) -> None:
    """Writes policy (and optionally value) params plus config and vocabulary to `path`."""
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, "params")):
        raise CheckpointError(f"{path}: already holds a checkpoint; choose an empty output directory")
    os.makedirs(path, exist_ok=True)
    tree = {"policy": params}
    if value_params is not None:
        tree["value"] = value_params
    tree = jax.tree_util.tree_map(np.asarray, tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, "params"), tree)
    vocab = _store_vocabulary(path, vocabulary_path)
    _write_model_json(path, config, vocab)


def read_model_json(path: str) -> dict:
    """The metadata a checkpoint or run directory records; CheckpointError (one line) if unreadable."""
    try:
        with open(os.path.join(path, MODEL_JSON)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{os.path.join(path, MODEL_JSON)}: unreadable ({e})") from None


def _vocab_from_meta(path: str, meta: dict) -> str | None:
    vocab = meta.get("vocabulary")
    if vocab in (None, BYTE_VOCABULARY):
        return vocab
    return os.path.join(path, vocab)


def _config_and_vocabulary(path: str, meta: Any) -> tuple[Any, str | None]:
    """The network config and vocabulary a `dro_jax_model.json` records; CheckpointError (one line
    naming the file) when it is malformed, checked before any params are restored."""
    from dro_jax import network

    where = os.path.join(path, MODEL_JSON)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: malformed (expected a JSON object, got {type(meta).__name__})")
    if "network" not in meta:
        raise CheckpointError(f"{where}: malformed (no 'network' entry with the model's config)")
    if not isinstance(meta["network"], dict):
        raise CheckpointError(f"{where}: malformed 'network' (expected an object, got "
                              f"{type(meta['network']).__name__})")
    try:
        config = network.T5Config.from_dict(meta["network"])
    except (TypeError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"{where}: malformed 'network' ({reason})") from None
    vocab = meta.get("vocabulary")
    if vocab is not None and (not isinstance(vocab, str) or not vocab.strip()):
        raise CheckpointError(f"{where}: malformed 'vocabulary' (expected a file name, 'byte' or null, "
                              f"got {json.dumps(vocab)[:40]})")
    return config, _vocab_from_meta(path, meta)


def _restore_tree(path: str, only: str | None = None) -> Any:
    """Restores a saved tree as host numpy arrays, whatever device layout wrote it; `only`: just
    that top-level key (a run's params, not its optimiser state and reference: a fraction of the RAM)."""
    # A run's `<step>/state` item has its metadata one level up (CheckpointManager's layout);
    # orbax's warning that the item lacks it reads like a damaged checkpoint.
    with io_utils.without_absl_messages("Metadata file does not exist"), ocp.PyTreeCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
        meta = getattr(meta, "tree", meta)
        if only is not None:
            if only not in meta:
                raise CheckpointError(f"{path}: the checkpoint holds no '{only}'")
            meta = {only: meta[only]}
        restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(item=meta if only else None, restore_args=restore_args,
                                                               partial_restore=only is not None))


def latest_step_dir(model_dir: str) -> str | None:
    ckpt_root = os.path.join(model_dir, "checkpoints")
    if not os.path.isdir(ckpt_root):
        return None
    steps = [int(d) for d in os.listdir(ckpt_root) if d.isdigit()]
    return os.path.join(ckpt_root, str(max(steps))) if steps else None


def run_dir_of(path: str) -> str | None:
    """The training run directory `path` is, or holds the step folder of (MODEL_DIR/checkpoints/N);
    None for a saved model checkpoint or a Hugging Face directory."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "params")):
        return None
    if os.path.basename(os.path.dirname(path)) == "checkpoints" and os.path.basename(path).isdigit():
        path = os.path.dirname(os.path.dirname(path))
    return path if os.path.isfile(os.path.join(path, MODEL_JSON)) else None


def _param_shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    unbox = lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x
    return {"/".join(str(getattr(k, "key", k)) for k in p): tuple(np.shape(unbox(x))) for p, x in leaves}


def check_params_fit(path: str, config, params) -> None:
    """Policy params that do not fit the network their dro_jax_model.json describes (a step folder
    under another run's file, an edited file) would fail deep inside flax: name the first misfit."""
    from dro_jax import network

    tokens = jnp.ones((1, 1), jnp.int32)
    init = lambda rng: network.T5(config).init(rng, tokens, tokens, enable_dropout=False)["params"]
    want, got = _param_shapes(jax.eval_shape(init, jax.random.PRNGKey(0))), _param_shapes(params)
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            has = f"has {got[name]}" if name in got else "lacks it"
            expects = f"its {MODEL_JSON} implies {want[name]}" if name in want else f"its {MODEL_JSON} has no such parameter"
            raise CheckpointError(f"{path}: parameter {name}: the checkpoint {has}, but {expects} "
                                  "(were the checkpoint and its run's metadata mixed up?)")


def load_model_checkpoint(path: str) -> ModelCheckpoint:
    """Loads policy params (and value params when present) from any supported format."""
    from dro_jax import hf  # late: keeps this module light for the trainer

    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint path does not exist")
    if os.path.isfile(os.path.join(path, MODEL_JSON)) and os.path.isdir(os.path.join(path, "params")):
        config, vocab = _config_and_vocabulary(path, read_model_json(path))
        tree = _restore_tree(os.path.join(path, "params"))
        check_params_fit(path, config, tree["policy"])
        return ModelCheckpoint(
            config=config,
            params=tree["policy"],
            value_params=tree.get("value"),
            vocabulary_path=vocab,
        )
    # A run directory, or one step folder inside it.
    run_dir, step_dir = path, None
    if os.path.basename(os.path.dirname(path)) == "checkpoints" and os.path.basename(path).isdigit():
        run_dir, step_dir = os.path.dirname(os.path.dirname(path)), path
    if os.path.isfile(os.path.join(run_dir, MODEL_JSON)):
        step_dir = step_dir or latest_step_dir(run_dir)
        if step_dir is None:
            raise CheckpointError(f"{run_dir}: training run has no saved checkpoint yet")
        config, vocab = _config_and_vocabulary(run_dir, read_model_json(run_dir))
        params = _restore_tree(os.path.join(step_dir, "state"), only="params")["params"]
        check_params_fit(step_dir, config, params["policy"])
        return ModelCheckpoint(
            config=config,
            params=params["policy"],
            value_params=params.get("value"),
            vocabulary_path=vocab,
            step=int(os.path.basename(step_dir)),
        )
    if hf.is_hf_t5_dir(path):
        config, params = hf.load_hf_t5(path)
        return ModelCheckpoint(config=config, params=params, vocabulary_path=hf.vocabulary_path(path))
    raise CheckpointError(
        f"{path}: not a dro_jax checkpoint ({MODEL_JSON} + params/), a training run directory, "
        "or a Hugging Face T5 directory (config.json + model.safetensors)")
