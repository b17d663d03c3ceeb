"""Model FLOPs of a T5 train step, by formula, and a dot-FLOP count of a traced program.

Only matrix multiplies are counted (2 FLOPs per multiply-add); layer norms, softmax,
log-softmax, the loss and the optimiser update are not. Notation: B batch, S input
length, T target length, D d_model, H heads, K d_kv (HK = H*K), F d_ff, V vocab,
m = 3 matrices per MLP for gated-gelu (wi_0, wi_1, wo), 2 for relu.

Forward FLOPs of one T5:
  encoder layer:  2*B*S*D*HK*4            q, k, v, out projections
                + 2*2*B*H*S*S*K           q.k^T and weights.v (full S x S)
                + 2*B*S*D*F*m             MLP
  decoder layer:  2*B*T*D*HK*4 + 2*2*B*H*T*T*K       self-attention (full T x T: the
                                                     causal mask does not skip work)
                + 2*B*T*D*HK*2 + 2*B*S*D*HK*2        cross-attention q, out | k, v
                + 2*2*B*H*T*S*K                      cross q.k^T and weights.v
                + 2*B*T*D*F*m                        MLP
  output layer:   2*B*T*D*V
The embedding lookup, the relative-position bias and mean pooling are gathers/sums, not
matmuls. A backward pass costs 2x its forward (gradients w.r.t. activations and weights;
the first layer's input gradient is needed too, since the embedding is trained).

Per train step ("model FLOPs", what the algorithm needs; used for MFU):
  dro_v:  3 * T5(B)                      policy forward + backward
        + 3 * encoder(B)                 separate value network (value_kind='separate';
                                         'shared' adds only a head, 'scalar' nothing)
        + 1 * T5(B)                      reference forward, unless precomputed
  kto:    3 * T5(B)                      policy on (x_i, y_i), forward + backward
        + 1 * decoder+output(B)          policy on mismatched (x_i, y_{i-1}): no gradient
                                         (the KL point is stop-gradient), and the encoder
                                         output of x_i is the same as above
        + 1 * T5(B) + 1 * decoder+output(B)   reference on both, unless precomputed
  sft:    3 * T5(B)
"As executed" FLOPs (`executed=True`) also count what the program recomputes: with
rematerialisation the matmuls each differentiated network recomputes in its backward pass
(`remat_recompute_flops`: about one more forward of its layers for 'full'), and the
policy's output matmul once more (log-probs are computed from the decoder states in
rematerialised time chunks, so [B, T, V] logits are never stored).
"""
from __future__ import annotations

from typing import Any

ALGORITHMS = ("dro_v", "kto", "sft")


def _dims(cfg):
    hk = cfg.num_heads * cfg.d_kv
    m = 3 if cfg.feed_forward_proj == "gated-gelu" else 2
    return cfg.d_model, hk, cfg.num_heads, cfg.d_kv, cfg.d_ff, m


def encoder_forward_flops(cfg, b: int, s: int) -> int:
    """Forward matmul FLOPs of the encoder stack (all layers)."""
    d, hk, h, k, f, m = _dims(cfg)
    layer = 2 * b * s * d * hk * 4 + 4 * b * h * s * s * k + 2 * b * s * d * f * m
    return cfg.num_encoder_layers * layer


def decoder_forward_flops(cfg, b: int, s: int, t: int) -> int:
    """Forward matmul FLOPs of the decoder stack (all layers), without the output layer."""
    d, hk, h, k, f, m = _dims(cfg)
    self_attn = 2 * b * t * d * hk * 4 + 4 * b * h * t * t * k
    cross = 2 * b * t * d * hk * 2 + 2 * b * s * d * hk * 2 + 4 * b * h * t * s * k
    mlp = 2 * b * t * d * f * m
    return cfg.num_decoder_layers * (self_attn + cross + mlp)


def output_forward_flops(cfg, b: int, t: int) -> int:
    return 2 * b * t * cfg.d_model * cfg.vocab_size


def t5_forward_flops(cfg, b: int, s: int, t: int) -> int:
    return (encoder_forward_flops(cfg, b, s) + decoder_forward_flops(cfg, b, s, t)
            + output_forward_flops(cfg, b, t))


def train_step_flops(cfg, algorithm: str, b: int, s: int, t: int, *, precomputed_ref: bool,
                     value_kind: str = "separate", executed: bool = False) -> dict[str, Any]:
    """Matmul FLOPs of one train step, with a breakdown by network. See the module doc."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    enc = encoder_forward_flops(cfg, b, s)
    dec = decoder_forward_flops(cfg, b, s, t) + output_forward_flops(cfg, b, t)
    full = enc + dec
    rec_enc = remat_recompute_flops(cfg, b, s, 0) if executed else 0
    rec_all = remat_recompute_flops(cfg, b, s, t) if executed else 0
    # models.py computes log-probs from decoder states in rematerialised time chunks: the
    # differentiated policy's output matmul runs once more in the backward pass.
    parts = {"policy": 3 * full + rec_all + (output_forward_flops(cfg, b, t) if executed else 0)}
    if algorithm == "dro_v" and value_kind == "separate":
        parts["value"] = 3 * enc + rec_enc
    if algorithm == "kto":  # models.KTOModel encodes the prompts once for both pairings
        parts["policy_kl"] = dec
    if algorithm != "sft" and not precomputed_ref:
        parts["reference"] = full
        if algorithm == "kto":
            parts["reference"] += dec
    return {"total": sum(parts.values()), **{k: int(v) for k, v in parts.items()}}


def remat_recompute_flops(cfg, b: int, s: int, t: int) -> int:
    """Matmul FLOPs a differentiated T5 recomputes in its backward pass under
    cfg.remat_policy (t = 0: the encoder alone, as in the value network).

    'full' / 'nothing_saveable': each layer's forward once more, except its last matmul
    (the MLP's wo: its output is not needed by the backward pass). 'dots_with_no_batch_dims_
    saveable': projections and MLP are saved, the attention-score and weights.v einsums
    (batch dims b, h) are recomputed. 'dots_with_no_batch_dims_and_attention_saveable': the
    same with XLA attention; 0 with cuDNN's, whose forward outputs it saves.
    'dots_saveable' / 'everything_saveable' / 'none': 0.
    """
    policy = cfg.remat_policy
    d, hk, h, k, f, m = _dims(cfg)
    if policy in ("none", "dots_saveable", "everything_saveable"):
        return 0
    if policy == "dots_with_no_batch_dims_and_attention_saveable" and cfg.attention_impl == "cudnn":
        return 0
    if policy in ("dots_with_no_batch_dims_saveable",
                  "dots_with_no_batch_dims_and_attention_saveable"):
        n = cfg.num_encoder_layers * 4 * b * h * s * s * k
        if t:
            n += cfg.num_decoder_layers * 4 * b * h * k * (t * t + t * s)
        return n
    n = encoder_forward_flops(cfg, b, s) - cfg.num_encoder_layers * 2 * b * s * f * d
    if t:
        n += decoder_forward_flops(cfg, b, s, t) - cfg.num_decoder_layers * 2 * b * t * f * d
    return n


# ----------------------------------------------------------------- jaxpr dot count


def _dot_flops(eqn) -> int:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    n = 2
    for dim in out:
        n *= int(dim)
    for ax in lhs_contract:
        n *= int(lhs[ax])
    return n


def _sub_jaxprs(value):
    """Jaxprs held in an equation parameter (ClosedJaxpr, Jaxpr, or tuples of them)."""
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)
        return
    inner = getattr(value, "jaxpr", None)
    if inner is not None and hasattr(inner, "eqns"):
        yield inner
    elif hasattr(value, "eqns"):
        yield value


def find_equations(jaxpr, matches) -> list:
    """Equations whose primitive name satisfies `matches(name)` in a (closed) jaxpr, including
    nested jaxprs (scan/while bodies, remat regions), each of those visited once."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    found = []
    for eqn in jaxpr.eqns:
        if matches(eqn.primitive.name):
            found.append(eqn)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found += find_equations(sub, matches)
    return found


def count_equations(jaxpr, matches) -> int:
    """How many `find_equations` finds."""
    return len(find_equations(jaxpr, matches))


def jaxpr_dot_flops(jaxpr) -> int:
    """2 * multiply-adds of every dot_general in a (closed) jaxpr, recursively.

    A scan body counts `length` times; a while loop's body once (its trip count is not
    static); a cond its most expensive branch.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if name == "cond":
            total += max((jaxpr_dot_flops(br) for br in eqn.params["branches"]), default=0)
            continue
        sub = 0
        for key, value in eqn.params.items():
            for j in _sub_jaxprs(value):
                sub += jaxpr_dot_flops(j)
        if name == "scan":
            sub *= int(eqn.params["length"])
        total += sub
    return total
