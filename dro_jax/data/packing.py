"""Per-segment reductions for packed batches (pure jnp, jit/shard friendly).

In a packed row, segment k (0-based) has segment id k + 1 and id 0 is padding
(see converters.PackedDROFeatureConverter).
"""
import jax
import jax.numpy as jnp


def segment_sum(token_values: jax.Array, segment_ids: jax.Array,
                num_segments: int) -> jax.Array:
  """Sums token values per segment.

  Args:
    token_values: [B, L] values (e.g. per-token log-probs times loss weights).
    segment_ids: [B, L] int, segment k has id k + 1, 0 = padding (ignored).
      Ids above num_segments are ignored as well.
    num_segments: K, static.

  Returns:
    [B, K]: out[b, k] = sum_l token_values[b, l] * (segment_ids[b, l] == k + 1).
  """
  # One-hot + einsum rather than scatter: dense, so it shards along the batch
  # axis and runs well on TPU/GPU; B*L*K is small next to the logits.
  onehot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=token_values.dtype)
  # HIGHEST: the default TPU f32 matmul rounds through bf16, too lossy for
  # summed log-probs.
  return jnp.einsum("bl,blk->bk", token_values, onehot,
                    precision=jax.lax.Precision.HIGHEST)
