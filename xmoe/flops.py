"""Parameter counts and MoE-correct FLOPs per token, from the config alone (torch-free).

`xmoectl` (plan, info, reports) and the trainer's MFU both use these, so a number printed
on a login node and one logged by a run agree. Shapes follow `xmoe.model.transformer`:
attention has fused QKV (3 D^2) and an output projection (D^2), no biases; dense layers
use a SwiGLU MLP of width `ffn_hidden`; MoE layers have a router (E x D), E routed experts
and `num_shared_experts` shared experts folded into one MLP of width S*F.

FLOPs: a multiply-add is 2 FLOPs; backward costs twice the forward, so training is 3x.
Attention scores (Q K^T and the weighted sum of V) are counted causally: a token at
position i attends to i+1 keys, so a sequence of S averages (S+1)/2 keys per token. Routed
experts count only the assignments capacity kept (`dropped_fraction` excluded); shared
experts, the router, dense layers and the LM head are counted in full. Norms, softmax,
activations and RoPE (O(D) per token) are left out, as is customary.
"""

from __future__ import annotations

from xmoe.config import Config


def _mats(activation: str) -> int:
    return 3 if activation == "swiglu" else 2  # SwiGLU: w1, w3, w2; GELU: w1, w2


def param_counts(cfg: Config) -> dict[str, int]:
    """Parameters by part, plus `total` and `activated` (what one token's forward uses)."""
    m, e = cfg.model, cfg.moe
    D, V = m.hidden, m.vocab_size
    moe_layers = m.layers - m.dense_layers
    mats = _mats(e.activation)
    counts = {
        "embedding": V * D,
        "lm_head": 0 if m.tie_embeddings else V * D,
        "attention": m.layers * 4 * D * D,
        "dense_mlp": m.dense_layers * 3 * D * m.ffn_hidden,
        "router": moe_layers * e.num_experts * D,
        "routed_experts": moe_layers * e.num_experts * mats * D * e.expert_hidden,
        "shared_experts": moe_layers * mats * D * e.num_shared_experts * e.expert_hidden,
        "norms": (2 * m.layers + 1) * D,
    }
    total = sum(counts.values())
    inactive = moe_layers * (e.num_experts - e.top_k) * mats * D * e.expert_hidden
    counts["total"] = total
    counts["activated"] = total - inactive
    return counts


def flops_breakdown(cfg: Config, dropped_fraction: float = 0.0) -> dict[str, float]:
    """Forward FLOPs per token by part (multiply by 3 for training)."""
    m, e = cfg.model, cfg.moe
    D, S = m.hidden, m.seq_len
    moe_layers = m.layers - m.dense_layers
    mats = _mats(e.activation)
    kept = 1.0 - dropped_fraction
    return {
        "attention_proj": m.layers * 2 * 4 * D * D,
        # QK^T and AV: 2 matmuls x 2 FLOPs x D per key, over (S+1)/2 keys on average
        "attention_scores": m.layers * 2 * 2 * D * (S + 1) / 2,
        "dense_mlp": m.dense_layers * 2 * 3 * D * m.ffn_hidden,
        "router": moe_layers * 2 * D * e.num_experts,
        "routed_experts": moe_layers * kept * e.top_k * 2 * mats * D * e.expert_hidden,
        "shared_experts": moe_layers * 2 * mats * D * e.num_shared_experts * e.expert_hidden,
        "lm_head": 2 * D * m.vocab_size,
    }


def flops_per_token(cfg: Config, dropped_fraction: float = 0.0) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), MoE-correct."""
    return 3.0 * sum(flops_breakdown(cfg, dropped_fraction).values())


# bf16 dense peak TFLOP/s per device, from vendor datasheets (MI250X: per GCD).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "MI250X": 191.5,
    "MI250": 181.0,
}


def datasheet_peak_tflops(device_name: str) -> float | None:
    """Peak bf16 TFLOP/s for a device name like 'NVIDIA H200' or 'AMD Instinct MI250X'."""
    name = device_name.upper()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None
