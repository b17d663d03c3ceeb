"""Tiny configs and random batches shared by the model/trainer tests."""
import jax
import jax.numpy as jnp
import numpy as np

from dro_jax import network

# Scanned layers: the train step compiles in about 60% of the unrolled time on CPU. The unrolled
# network is covered by test_network, test_hf_parity and test_scan_layers (scanned == unrolled).
TINY = dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
            num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
            scan_layers=True)


def tiny_config(**overrides) -> network.T5Config:
    return network.T5Config(**{**TINY, **overrides})


def random_batch(seed: int = 0, batch: int = 8, inputs_len: int = 12, targets_len: int = 10,
                 vocab: int = 64, reward_kind: str = "thumbs") -> dict:
    """An unpacked model batch with right padding, EOS (1) ending each target."""
    rng = np.random.default_rng(seed)
    enc = np.zeros((batch, inputs_len), np.int32)
    tgt = np.zeros((batch, targets_len), np.int32)
    for i in range(batch):
        n_in = rng.integers(3, inputs_len + 1)
        enc[i, :n_in] = rng.integers(2, vocab, n_in)
        enc[i, n_in - 1] = 1
        n_t = rng.integers(2, targets_len + 1)
        tgt[i, :n_t] = rng.integers(2, vocab, n_t)
        tgt[i, n_t - 1] = 1
    dec_in = np.zeros_like(tgt)
    dec_in[:, 1:] = tgt[:, :-1]
    if reward_kind == "thumbs":
        rewards = rng.choice([-1.0, 1.0], batch).astype(np.float32)
    else:
        rewards = rng.normal(size=batch).astype(np.float32)
    return {
        "encoder_input_tokens": enc,
        "decoder_input_tokens": dec_in,
        "decoder_target_tokens": tgt,
        "decoder_loss_weights": (tgt > 0).astype(np.int32),
        "rewards": rewards,
    }


def random_params(abstract_params, seed: int = 0):
    """Random float32 values for an abstract (eval_shape) param tree, boxed or not.

    Avoids compiling model.init (slow on CPU); scales keep T5 activations O(1).
    """
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.2 * rng.normal(size=s.shape), jnp.float32)
        fan_in = s.shape[0] * (s.shape[1] if "'out'" in name else 1)
        std = 1.0 if "embedding" in name else fan_in ** -0.5
        return jnp.asarray(std * rng.normal(size=s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_params)


def assert_kept_work_names_the_weights(partial, checkpoint) -> dict:
    """The settings an interrupted infer/score kept (OUTPUT.partial.npz), after checking that they
    name the checkpoint's weights by their digest, not only by its path."""
    import json

    from dro_jax import checkpoints, io_utils

    with np.load(partial) as kept:
        settings = json.loads(str(kept["settings"]))
    assert settings["params"] == io_utils.params_digest(checkpoints.load_model_checkpoint(checkpoint).params)
    return settings
