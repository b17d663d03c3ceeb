"""seqio feature converters for DRO batches (DESIGN section 2).

`DROFeatureConverter` (unpacked), per example, with I/T the task feature lengths:
  encoder_input_tokens   int32 [I]
  decoder_target_tokens  int32 [T]
  decoder_input_tokens   int32 [T]  targets shifted right, bos_id (0) first
  decoder_loss_weights   int32 [T]  1 on non-padding target positions
  rewards                float32 []
  ref_logprobs           float32 []  when the task provides it
  weights                float32 []  only with carry_weights=True

`PackedDROFeatureConverter(max_segments=K)` packs several examples per row
(seqio's own packing drops float features): the token features above plus
  encoder_segment_ids, decoder_segment_ids  int32 [I]/[T]  segment k has id k+1, 0 = pad
  encoder_positions, decoder_positions      int32 [I]/[T]  position within the segment
  rewards, ref_logprobs, weights            float32 [K]  per segment (0 for empty)
  segment_weights                           float32 [K]  1 real segment, 0 empty
decoder_input_tokens restart at bos_id at each segment start.
"""
from __future__ import annotations

import copy
from typing import Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

FeatureSpec = seqio.FeatureConverter.FeatureSpec
_TOKEN_FEATURES = ("encoder_input_tokens", "decoder_target_tokens",
                   "decoder_input_tokens", "decoder_loss_weights")

class DROFeatureConverter(seqio.FeatureConverter):
  """Unpacked encoder-decoder converter that carries rewards (and ref log-probs).

  Takes the same keyword arguments t5x passes to feature converters. Whether
  `ref_logprobs` is produced follows the task (auto-detected from the dataset)
  unless `ref_logprobs` is set: True requires it, False drops it.
  """

  TASK_FEATURES = {
      "inputs": FeatureSpec(dtype=tf.int32),
      "targets": FeatureSpec(dtype=tf.int32),
  }
  MODEL_FEATURES = {
      **{k: FeatureSpec(dtype=tf.int32) for k in _TOKEN_FEATURES},
      "rewards": FeatureSpec(dtype=tf.float32, rank=0),
  }
  PACKING_FEATURE_DTYPES = None
  _SCALARS_RANK = 0

  def __init__(self, pack: bool = False, use_custom_packing_ops: bool = False,
               apply_length_check: bool = True, bos_id: int = 0,
               passthrough_features: Optional[Mapping[str, FeatureSpec]] = None,
               ref_logprobs: Optional[bool] = None, carry_weights: bool = False):
    if pack and not isinstance(self, PackedDROFeatureConverter):
      raise ValueError("DROFeatureConverter does not pack; seqio's packing would "
                       "drop rewards. Use PackedDROFeatureConverter(max_segments=K).")
    super().__init__(pack=pack, use_custom_packing_ops=use_custom_packing_ops,
                     apply_length_check=apply_length_check, bos_id=bos_id,
                     passthrough_features=passthrough_features)
    self._ref_logprobs = ref_logprobs
    self._carry_weights = carry_weights
    self._set_optional(bool(ref_logprobs))

  def _set_optional(self, with_ref: bool) -> None:
    """Sets this instance's MODEL_FEATURES for the optional float features."""
    self._with_ref = with_ref
    feats = dict(type(self).MODEL_FEATURES)
    rank = self._SCALARS_RANK
    if with_ref:
      feats["ref_logprobs"] = FeatureSpec(dtype=tf.float32, rank=rank)
    if self._carry_weights:
      feats["weights"] = FeatureSpec(dtype=tf.float32, rank=rank)
    self.MODEL_FEATURES = feats  # pylint: disable=invalid-name

  def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
               ) -> tf.data.Dataset:
    spec = ds.element_spec
    for k in ("rewards",) + (("weights",) if self._carry_weights else ()):
      if k not in spec:
        raise ValueError(f"{type(self).__name__}: the dataset has no {k!r} "
                         f"feature (got {sorted(spec)}); use a feedback task")
    has_ref = "ref_logprobs" in spec
    if self._ref_logprobs and not has_ref:
      raise ValueError(f"{type(self).__name__}(ref_logprobs=True): the task has no "
                       "'ref_logprobs' (score the log first)")
    with_ref = has_ref if self._ref_logprobs is None else self._ref_logprobs
    conv = self
    if with_ref != self._with_ref:
      conv = copy.copy(self)  # do not mutate a converter shared by callers
      conv._set_optional(with_ref)  # pylint: disable=protected-access
    return seqio.FeatureConverter.__call__(conv, ds, task_feature_lengths)

  def _floats(self):
    return (("rewards",) + (("ref_logprobs",) if self._with_ref else ())
            + (("weights",) if self._carry_weights else ()))

  def _convert_features(self, ds, task_feature_lengths):
    ds = seqio.utils.trim_and_pad_dataset(
        ds, {k: task_feature_lengths[k] for k in ("inputs", "targets")})
    floats = self._floats()
    passthrough = tuple(self._passthrough_features)

    def convert(ex):
      targets = ex["targets"]
      out = {
          "encoder_input_tokens": ex["inputs"],
          "decoder_target_tokens": targets,
          "decoder_input_tokens": seqio.utils.make_autoregressive_inputs(
              targets, bos_id=self.bos_id),
          "decoder_loss_weights": tf.cast(tf.not_equal(targets, 0), tf.int32),
      }
      out.update({k: tf.cast(ex[k], tf.float32) for k in floats})
      out.update({k: ex[k] for k in passthrough})
      return out

    return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

  def get_model_feature_lengths(self, task_feature_lengths):
    """Lengths per feature; scalar features get 1 (their length is unused)."""
    enc, dec = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    lengths = {k: dec for k in _TOKEN_FEATURES}
    lengths["encoder_input_tokens"] = enc
    lengths.update({k: 1 for k in self._floats()})
    lengths.update({k: task_feature_lengths[k] for k in self._passthrough_features})
    return lengths


class PackedDROFeatureConverter(DROFeatureConverter):
  """Packs up to `max_segments` examples per row, with per-segment rewards.

  Packing is first-fit-decreasing over windows of `window` consecutive examples
  (numpy inside tf.numpy_function), so it is deterministic given the input
  order. An example longer than a feature length is trimmed first (the task
  counts those); every example lands in exactly one row.
  """

  MODEL_FEATURES = {
      **{k: FeatureSpec(dtype=tf.int32) for k in _TOKEN_FEATURES},
      "rewards": FeatureSpec(dtype=tf.float32),
      "segment_weights": FeatureSpec(dtype=tf.float32),
  }
  PACKING_FEATURE_DTYPES = {
      "encoder_segment_ids": tf.int32, "decoder_segment_ids": tf.int32,
      "encoder_positions": tf.int32, "decoder_positions": tf.int32,
  }
  _SCALARS_RANK = 1

  def __init__(self, max_segments: int = 8, window: int = 1024, pack: bool = True,
               use_custom_packing_ops: bool = False, apply_length_check: bool = True,
               bos_id: int = 0, passthrough_features=None,
               ref_logprobs: Optional[bool] = None, carry_weights: bool = False):
    if not pack:
      raise ValueError("PackedDROFeatureConverter always packs; use DROFeatureConverter")
    if passthrough_features:
      raise ValueError("pass-through features cannot be packed")
    if max_segments < 1 or window < 1:
      raise ValueError("max_segments and window must be >= 1")
    self.max_segments, self.window = int(max_segments), int(window)
    super().__init__(pack=True, use_custom_packing_ops=use_custom_packing_ops,
                     apply_length_check=apply_length_check, bos_id=bos_id,
                     ref_logprobs=ref_logprobs, carry_weights=carry_weights)

  def _convert_features(self, ds, task_feature_lengths):
    enc, dec = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    k, floats = self.max_segments, self._floats()
    ds = ds.map(lambda ex: {"inputs": ex["inputs"][:enc], "targets": ex["targets"][:dec],
                            **{f: tf.cast(ex[f], tf.float32) for f in floats}},
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.ragged_batch(self.window)
    names = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
             "decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights",
             "decoder_segment_ids", "decoder_positions", "segment_weights") + floats

    def pack(batch):
      out = tf.numpy_function(
          lambda iv, isp, tv, tsp, *fl: _pack_window(
              iv, isp, tv, tsp, fl, enc, dec, k, self.bos_id),
          [batch["inputs"].values, batch["inputs"].row_splits,
           batch["targets"].values, batch["targets"].row_splits]
          + [batch[f] for f in floats],
          [tf.int32] * 8 + [tf.float32] * (1 + len(floats)), stateful=False)
      lens = [enc] * 3 + [dec] * 5 + [k] * (1 + len(floats))
      for t, n in zip(out, lens):
        t.set_shape([None, n])
      return tf.data.Dataset.from_tensor_slices(dict(zip(names, out)))

    return ds.flat_map(pack)

  def get_model_feature_lengths(self, task_feature_lengths):
    enc, dec = task_feature_lengths["inputs"], task_feature_lengths["targets"]
    lengths = {k: dec for k in _TOKEN_FEATURES}
    lengths["encoder_input_tokens"] = enc
    lengths.update(encoder_segment_ids=enc, encoder_positions=enc,
                   decoder_segment_ids=dec, decoder_positions=dec)
    lengths.update({k: self.max_segments for k in self._floats() + ("segment_weights",)})
    return lengths


def assign_bins(in_lens: np.ndarray, tgt_lens: np.ndarray, enc: int, dec: int,
                max_segments: int) -> list:
  """First-fit-decreasing: lists of example indices, one list per packed row.

  Rows keep their examples in input order, so the packing is deterministic.
  """
  order = sorted(range(len(in_lens)), key=lambda i: (-(in_lens[i] + tgt_lens[i]), i))
  bins, fill = [], []  # fill: [enc used, dec used]
  for i in order:
    for b, (fe, fd) in enumerate(fill):
      if (fe + in_lens[i] <= enc and fd + tgt_lens[i] <= dec
          and len(bins[b]) < max_segments):
        bins[b].append(i)
        fill[b] = (fe + in_lens[i], fd + tgt_lens[i])
        break
    else:
      bins.append([i])
      fill.append((in_lens[i], tgt_lens[i]))
  bins = [sorted(b) for b in bins]
  bins.sort(key=lambda b: b[0])
  return bins


def _pack_window(iv, isp, tv, tsp, floats, enc, dec, k, bos_id):
  """Packs one window of examples into rows (numpy)."""
  in_lens, tgt_lens = np.diff(isp), np.diff(tsp)
  bins = assign_bins(in_lens, tgt_lens, enc, dec, k)
  n = len(bins)
  e_tok, e_seg, e_pos = (np.zeros((n, enc), np.int32) for _ in range(3))
  d_tok, d_in, d_w, d_seg, d_pos = (np.zeros((n, dec), np.int32) for _ in range(5))
  seg_w = np.zeros((n, k), np.float32)
  fl = [np.zeros((n, k), np.float32) for _ in floats]
  for r, b in enumerate(bins):
    pe = pd = 0
    for s, i in enumerate(b):
      li, lt = int(in_lens[i]), int(tgt_lens[i])
      e_tok[r, pe:pe + li] = iv[isp[i]:isp[i + 1]]
      e_seg[r, pe:pe + li] = s + 1
      e_pos[r, pe:pe + li] = np.arange(li)
      tgt = tv[tsp[i]:tsp[i + 1]]
      d_tok[r, pd:pd + lt] = tgt
      d_in[r, pd] = bos_id
      d_in[r, pd + 1:pd + lt] = tgt[:-1]
      d_w[r, pd:pd + lt] = (tgt != 0)
      d_seg[r, pd:pd + lt] = s + 1
      d_pos[r, pd:pd + lt] = np.arange(lt)
      seg_w[r, s] = 1.0
      for f, src in zip(fl, floats):
        f[r, s] = src[i]
      pe, pd = pe + li, pd + lt
  return (e_tok, e_seg, e_pos, d_tok, d_in, d_w, d_seg, d_pos, seg_w, *fl)
