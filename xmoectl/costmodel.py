"""Per-GPU memory and step time of one training layout on one site (torch-free arithmetic).

The planner (`xmoectl.planner`) calls `evaluate(cfg, layout, hw, nodes)` for every
candidate layout. Everything here is closed-form so that a plan over thousands of layouts
answers in a fraction of a second on a login node. Sizes are bytes, times seconds; "GiB"
is 2**30 bytes. docs/PLANNER.md derives every term and records how the predictions
compare with measurements.

Memory (the busiest GPU, as `torch.cuda.max_memory_allocated` would see it):
  weights + gradients + optimizer states (ZeRO over DP for dense parameters, over
  expert-DP for experts) + ZeRO buckets + saved activations of every layer (or only the
  layer inputs with activation checkpointing) + the LM head and loss + the transient
  buffers of the layer being back-propagated. A GPU needs that times the allocator's
  fragmentation plus the runtime's own context (CUDA/HIP, NCCL/RCCL buffers).
Step time (no overlap assumed between compute and communication, as the trainer runs):
  accumulation x (dense GEMMs + attention + expert grouped GEMMs on the busiest GPU +
  all-to-alls) + summing the micro-batches' gradients + gradient reduction
  (reduce-scatter + all-gather over DP and expert-DP) + the optimizer's memory-bound update.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from xmoe.config import dedup_ep_active, dedup_fixed_active, expected_unique_nodes

GIB = 2**30
ACT_BYTES = 2  # bf16 activations
F32 = 4
LOSS_CHUNK_BYTES = 1 << 28  # logits of one chunk of the fused LM loss (xmoe.kernels.cross_entropy)
DISPATCHERS = ("pft", "rbd", "padded", "deepspeed")
# DeepSpeed's default ZeRO bucket sizes (elements): reduce_bucket_size, allgather_bucket_size
ZERO_BUCKET_ELEMS = 500_000_000


@dataclass(frozen=True)
class Hardware:
    """One node type as the cost model sees it; built from a site profile (+ measurements)."""

    gpus_per_node: int
    hbm_gib: float
    peak_tflops: float  # bf16 datasheet peak per device
    gemm_tflops: float  # achievable on large bf16 GEMMs (measured, or a fraction of the peak)
    intra_gbs: float  # all-to-all GB/s per GPU inside a node
    inter_gbs: float  # all-to-all GB/s per GPU across nodes (its share of the node's NICs)
    allreduce_intra_gbs: float  # all-reduce bus bandwidth inside a node
    node_nic_gbs: float  # all NICs of a node together (bus bandwidth across nodes)
    hbm_tbs: float = 1.5  # device memory bandwidth (the optimizer update is bound by it)
    source: str = "datasheet"


@dataclass(frozen=True)
class Assumptions:
    """The model's knobs; defaults are documented in docs/PLANNER.md with their origin."""

    # busiest GPU's routed rows over the mean early in training (memory headroom, dropless)
    imbalance: float = 1.5
    # the same ratio once the balancing losses have done their work (step time)
    time_imbalance: float = 1.15
    # achievable GEMM rate as a fraction of the datasheet peak when nothing was measured
    gemm_fraction: float = 0.7
    dense_efficiency: float = 0.85  # dense layers at model shapes, relative to large GEMMs
    attention_efficiency: float = 0.5  # fused attention relative to large GEMMs
    # grouped GEMM: efficiency = expert_max * M / (M + expert_half_rows), M rows per expert
    expert_max: float = 0.9
    expert_half_rows: float = 448.0
    latency_intra_s: float = 20e-6  # per collective inside a node
    latency_inter_s: float = 50e-6  # per collective across nodes
    host_sync_s: float = 30e-6  # the one device-to-host sync of split sizes per exchange
    fragmentation: float = 1.08  # caching allocator's reserve over the allocated peak
    context_gib: float = 1.5  # runtime context and collective buffers, outside the allocator


@dataclass(frozen=True)
class Layout:
    """One way to lay a run out on the ranks; `overrides` turns it into config settings."""

    tp: int = 1
    ep: int = 1
    dispatcher: str = "pft"
    micro_batch: int = 1
    checkpointing: bool = False
    zero_stage: int = 1
    capacity_factor: float | None = None  # None = dropless
    ssmb: bool = True

    def label(self) -> str:
        cap = "dropless" if not self.capacity_factor else f"cf{self.capacity_factor:g}"
        ssmb = "" if self.tp == 1 or self.ssmb else " noSSMB"
        ac = " AC" if self.checkpointing else ""
        return (
            f"TP{self.tp} EP{self.ep} {self.dispatcher} mb{self.micro_batch} "
            f"Z{self.zero_stage} {cap}{ac}{ssmb}"
        )

    def overrides(self) -> list[str]:
        cf = "null" if not self.capacity_factor else f"{self.capacity_factor:g}"
        return [
            f"parallel.tp={self.tp}",
            f"parallel.ep={self.ep}",
            f"parallel.ssmb={str(self.ssmb).lower()}",
            f"parallel.zero_stage={self.zero_stage}",
            f"moe.dispatcher={self.dispatcher}",
            f"moe.capacity_factor={cf}",
            f"train.micro_batch={self.micro_batch}",
            f"train.activation_checkpointing={str(self.checkpointing).lower()}",
        ]


@dataclass
class Estimate:
    """Predicted memory (GiB) and time (s) of one layout, and why it is rejected, if it is."""

    layout: Layout
    memory: dict[str, float] = field(default_factory=dict)
    time: dict[str, float] = field(default_factory=dict)
    reason: str = ""  # empty = fits

    @property
    def fits(self) -> bool:
        return not self.reason

    @property
    def peak_gib(self) -> float:
        return self.memory["peak_allocated"]

    @property
    def needed_gib(self) -> float:
        return self.memory["needed"]

    @property
    def step_s(self) -> float:
        return self.time["step"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layout": asdict(self.layout),
            "label": self.layout.label(),
            "fits": self.fits,
            "reason": self.reason,
            "memory_gib": {k: round(v, 3) for k, v in self.memory.items()},
            "time_s": {k: round(v, 6) for k, v in self.time.items()},
        }


# --------------------------------------------------------------------------- shapes


def _mats(activation: str) -> int:
    return 3 if activation == "swiglu" else 2


def _fixed_slots(cfg: Any, layout: Layout) -> bool:
    """`moe.dedup_fixed_slots` in effect for this layout: every token has a pilot slot for
    every rank, filled or not (`xmoe.config.dedup_fixed_active`)."""
    moe = replace(cfg.moe, capacity_factor=layout.capacity_factor)
    return dedup_fixed_active(moe, layout.dispatcher, layout.ep)


def _dedup(cfg: Any, layout: Layout) -> bool:
    """`moe.dedup_ep` in effect for this layout (as set, else on for dropless PFT with EP
    unless `moe.overlap_ep`): one row per (token, destination rank) crosses. The layout's
    own capacity factor decides dropless, as it does in the job it becomes."""
    moe = replace(cfg.moe, capacity_factor=layout.capacity_factor)
    return dedup_ep_active(moe, layout.dispatcher, layout.ep)


def local_params(cfg: Any, layout: Layout) -> tuple[float, float]:
    """(dense, expert) parameters held by one GPU.

    Attention and dense MLPs shard over TP (heads, hidden units); the embedding, the LM
    head, norms, routers and shared experts are replicated and work on this TP rank's
    slice of the sequence (`xmoe.parallel.tensor_parallel`); routed experts shard over EP.
    """
    from xmoe.flops import param_counts

    p = param_counts(cfg)
    t = layout.tp
    sharded = p["attention"] + p["dense_mlp"]
    replicated = p["embedding"] + p["lm_head"] + p["norms"] + p["router"] + p["shared_experts"]
    return sharded / t + replicated, p["routed_experts"] / layout.ep


def rows_factor(cfg: Any, layout: Layout, imbalance: float) -> float:
    """Routed rows on the busiest GPU over the mean when routing is `imbalance`-skewed."""
    cf = layout.capacity_factor
    if layout.ep == 1 and layout.dispatcher in ("pft", "rbd"):
        return 1.0  # every routed row stays on this GPU: skew moves rows between its experts
    if layout.dispatcher == "padded":
        return cf or imbalance  # always padded to capacity
    if layout.dispatcher == "deepspeed":
        return cf or imbalance  # dropless DeepSpeed pads every expert to the busiest one
    return min(imbalance, cf) if cf else imbalance


# --------------------------------------------------------------------------- memory


def activation_bytes_per_token(cfg: Any, layout: Layout, imbalance: float) -> dict[str, float]:
    """Bytes saved for backward per token of this GPU's micro-batch, one layer of each kind.

    Counted from what autograd keeps in `xmoe.model.transformer` (checked tensor by tensor
    with saved-tensor hooks, tests/test_planner_activations.py): RMSNorm saves its bf16
    input and an fp32 1/rms per token; attention the QKV projection's input, the roped q
    and k and the copied v (`xmoe.kernels.rope`) and the fused kernel's output (which the
    output projection reads as its input, without a copy); a SwiGLU MLP four tensors of
    its hidden width (GELU two); a MoE block its router's bf16 input (shared with the
    shared experts'), fp32 probabilities and logits, the received rows (unless PFT rebuilds
    them: `moe.recompute_permute`), the expert
    intermediates, the returned rows for the weighted combine (not with PFT, whose
    experts apply the weights) and int64 row indices. The LM head keeps the fp32
    log-probabilities. With TP (sequence parallelism, `xmoe.parallel.tensor_parallel`)
    every rank holds 1/t of the tokens outside attention and the dense MLPs, which keep
    their gathered full-sequence input and 1/t of the heads or hidden units; SSMB runs the
    MoE block on the slice (plain TP: on the gathered full sequence).
    """
    m, e = cfg.model, cfg.moe
    D, V, E, k, F = m.hidden, m.vocab_size, e.num_experts, e.top_k, e.expert_hidden
    b, t = ACT_BYTES, layout.tp
    moe_share = 1.0 / t if layout.ssmb else 1.0
    r = rows_factor(cfg, layout, imbalance)
    norm = (b * D + F32) / t  # its input and 1/rms per row (xmoe.kernels.rmsnorm)
    attention = norm + b * D + (3 * b + b) * D / t
    dense_mlp = norm + b * D + 4 * b * m.ffn_hidden / t
    # PFT folds the combine weights into the activation (moe.fold_combine_weights): the
    # combine keeps no returned rows and SwiGLU keeps h1, h3 and the scaled product only
    fold = e.fold_combine_weights and layout.dispatcher == "pft"
    saved_inter = (3 if fold else 4) if e.activation == "swiglu" else 2
    returned = 0.0 if fold else k * b * D
    # moe.recompute_permute (PFT, one EP rank): the experts' input rows are gathered
    # again in backward, not kept
    rows = 0.0 if e.recompute_permute and layout.dispatcher == "pft" and layout.ep == 1 else b * D
    routed = k * r * (rows + saved_inter * b * F) + returned + 3 * 8 * k
    shared = 0.0
    if e.num_shared_experts:
        shared = b * D + saved_inter * b * e.num_shared_experts * F
    # the router keeps its bf16 input (the same tensor the shared experts keep) and fp32
    # probabilities and logits
    router = (0.0 if e.num_shared_experts else b * D) + 2 * F32 * E
    padded = 0.0
    if layout.dispatcher in ("padded", "deepspeed"):
        # GShard-style dense dispatch mask and combine weights: T x E x C, C = T k cf / E
        tokens = layout.micro_batch * m.seq_len * moe_share
        padded = 2 * b * tokens * k * r
    moe = norm + moe_share * (router + routed + shared + padded)
    if t > 1 and not layout.ssmb:
        moe += b * D  # the gathered sequence
    if m.fused_lm_loss:
        # xmoe.kernels.cross_entropy: the gradients made in forward wait for backward, the
        # head input's per token and the head weight's once (`head_fixed`, bytes); the
        # transient is one chunk of bf16 logits, overwritten by their gradient
        head = norm + b * D / t
        head_fixed = b * V * D
        loss_peak = 0.0
        loss_chunk = float(LOSS_CHUNK_BYTES)
    else:
        # its input (for the weight's gradient) and the fp32 log-probabilities
        head = norm + (b * D + F32 * V) / t
        head_fixed = 0.0
        # the loss's transient peak: bf16 logits, their fp32 copy, then the fp32 gradient
        loss_peak = (b + 2 * F32) * V / t
        loss_chunk = 0.0
    return {
        "attention": attention,
        "dense_mlp": dense_mlp,
        "moe": moe,
        "head": head,
        "head_fixed": head_fixed,
        "loss_peak": loss_peak,
        "loss_chunk": loss_chunk,
    }


def memory_estimate(
    cfg: Any, layout: Layout, hw: Hardware, world: int, a: Assumptions
) -> dict[str, float]:
    """Per-GPU memory by part, in GiB; `peak_allocated` and `needed` are the totals."""
    m, e = cfg.model, cfg.moe
    pbytes = 4 if cfg.train.dtype == "fp32" else 2
    dense, expert = local_params(cfg, layout)
    dp, edp = world // layout.tp, world // layout.ep
    shard = 1 if layout.zero_stage == 0 else None
    dense_part = dense / (shard or dp)
    expert_part = expert / (shard or edp)
    weights = pbytes * (dense + expert)
    # DeepSpeed accumulates the micro-batches' gradients in the model's dtype (its default
    # grad_accum_dtype for bf16): every gradient under ZeRO-1, this rank's reduce-scattered
    # shard under ZeRO-2. The fp32 copy of the shard the optimizer reads exists only in the
    # update, after the activations are gone and as the bf16 gradients are released, so it
    # is a second peak, not part of the backward one (measured on H200: docs/PLANNER.md).
    held = (dense_part + expert_part) if layout.zero_stage >= 2 else (dense + expert)
    if cfg.train.grad_accum_dtype == "fp32" and pbytes == 2:
        # DeepSpeed's bf16 optimizer (ZeRO-1) accumulates every gradient in an fp32 buffer
        # beside the bf16 ones (measured on one H200: +14.2 GiB for 4.06B parameters, about
        # 4 more bytes each); ZeRO-2 (not measured): the reduce-scattered shard in fp32 beside
        # its bf16 one. The update reads those buffers directly.
        grads = (F32 + pbytes) * held
        step_grads = 0.0
    else:
        grads = pbytes * held
        step_grads = F32 * (dense_part + expert_part)
    optimizer = 3 * F32 * (dense_part + expert_part)  # fp32 master, Adam m and v
    buckets = pbytes * min(ZERO_BUCKET_ELEMS, dense + expert)

    T = layout.micro_batch * m.seq_len  # tokens of one micro-batch on this DP rank
    per_tok = activation_bytes_per_token(cfg, layout, a.imbalance)
    moe_layers = m.layers - m.dense_layers
    layers = (
        m.dense_layers * (per_tok["attention"] + per_tok["dense_mlp"])
        + moe_layers * (per_tok["attention"] + per_tok["moe"])
    ) * T
    kinds = [per_tok["moe"]] if moe_layers else []
    kinds += [per_tok["dense_mlp"]] if m.dense_layers else []
    biggest = (per_tok["attention"] + max(kinds)) * T
    if layout.checkpointing:
        # only each block's input stays; backward recomputes one block at a time
        activations = m.layers * ACT_BYTES * m.hidden * T / layout.tp + biggest
    else:
        activations = layers
    head = per_tok["head"] * T + per_tok["head_fixed"]
    # the layer being back-propagated: gradients mirror its saved tensors, plus the
    # all-to-all send and receive buffers of its routed rows
    moe_tokens = T / layout.tp if layout.ssmb else T
    r = rows_factor(cfg, layout, a.imbalance)
    a2a = 2 * e.top_k * r * ACT_BYTES * m.hidden * moe_tokens if moe_layers else 0.0
    if _dedup(cfg, layout):
        # pilots travel (sent and received), the expert rows are made from them on arrival
        pilots = expected_unique_nodes(e.num_experts, e.top_k, layout.ep)
        if _fixed_slots(cfg, layout):
            pilots = layout.ep
        a2a *= (e.top_k + pilots) / (2 * e.top_k)
    if layout.dispatcher == "rbd":
        a2a *= 1.5  # pilot rows are staged once more between the two exchanges
    if per_tok["loss_chunk"]:  # one chunk of logits, or all of them if fewer
        loss_transient = min(per_tok["loss_chunk"], ACT_BYTES * m.vocab_size * T / layout.tp)
    else:
        loss_transient = per_tok["loss_peak"] * T
    transient = max(biggest + a2a, loss_transient)

    parts = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "zero_buckets": buckets,
        "activations": activations,
        "lm_head_loss": head,
        "transient": transient,
    }
    out = {k: v / GIB for k, v in parts.items()}
    out["update_fp32_gradients"] = step_grads / GIB
    static = out["weights"] + out["optimizer"] + out["zero_buckets"]
    out["backward_peak"] = sum(out[k] for k in parts)
    out["update_peak"] = static + out["update_fp32_gradients"]
    out["peak_allocated"] = max(out["backward_peak"], out["update_peak"])
    out["needed"] = out["peak_allocated"] * a.fragmentation + a.context_gib
    return out


# --------------------------------------------------------------------------- time


def _group_nodes(ranks: range, gpn: int) -> int:
    return len({r // gpn for r in ranks})


def _allreduce_bw(hw: Hardware, members: int, nodes: int, concurrent: int) -> float:
    """Bus bandwidth of a ring over `members` ranks on `nodes` nodes while `concurrent`
    such groups share each node's NICs."""
    if members <= 1:
        return float("inf")
    if nodes <= 1:
        return hw.allreduce_intra_gbs
    return min(hw.allreduce_intra_gbs, hw.node_nic_gbs / max(1, concurrent))


def time_estimate(
    cfg: Any, layout: Layout, hw: Hardware, world: int, a: Assumptions
) -> dict[str, float]:
    """Seconds per optimizer step by part (`step` is the total) and tokens/s, TFLOP/s."""
    from xmoe.flops import flops_breakdown, flops_per_token

    m, e = cfg.model, cfg.moe
    gpn = hw.gpus_per_node
    t, ep = layout.tp, layout.ep
    dp = world // t
    accum = cfg.train.global_batch // (layout.micro_batch * dp)
    T = layout.micro_batch * m.seq_len
    moe_tokens = T / t if layout.ssmb else T
    moe_layers = m.layers - m.dense_layers
    fb = flops_breakdown(cfg)
    recompute = 4 / 3 if layout.checkpointing else 1.0
    gemm = hw.gemm_tflops * 1e12

    dense_flops = 3 * T / t * (fb["attention_proj"] + fb["dense_mlp"]) * recompute
    dense_flops += 3 * T / t * fb["lm_head"]
    dense_flops += 3 * moe_tokens * (fb["router"] + fb["shared_experts"]) * recompute
    attn_flops = 3 * T / t * fb["attention_scores"] * recompute
    r = rows_factor(cfg, layout, a.time_imbalance)
    rows_per_expert = moe_tokens * e.top_k * ep / e.num_experts
    expert_eff = a.expert_max * rows_per_expert / (rows_per_expert + a.expert_half_rows)
    expert_flops = 3 * moe_tokens * r * fb["routed_experts"] * recompute
    dense_s = dense_flops / (gemm * a.dense_efficiency)
    attn_s = attn_flops / (gemm * a.attention_efficiency)
    expert_s = expert_flops / (gemm * expert_eff) if expert_flops else 0.0

    a2a_s = 0.0
    if moe_layers and ep > 1:
        per_layer = (6 if layout.checkpointing else 4) * _all_to_all_s(
            cfg, layout, hw, moe_tokens, r, a
        )
        a2a_s = moe_layers * per_layer
    # dispatch work besides the exchange: the permute, regroup and weighted combine copy
    # every routed row (read + write, forward and backward), and each dispatch and combine
    # waits for one host sync of the split sizes
    passes = 3 if layout.checkpointing else 2
    moved = passes * 2 * 2 * moe_tokens * e.top_k * r * ACT_BYTES * m.hidden
    dispatch_s = moe_layers * (moved / (hw.hbm_tbs * 1e12) + passes * 2 * a.host_sync_s)
    tp_s = _tensor_parallel_s(cfg, layout, hw, T, a) if t > 1 else 0.0
    micro = dense_s + attn_s + expert_s + dispatch_s + a2a_s + tp_s

    pbytes = 4 if cfg.train.dtype == "fp32" else 2
    dense_p, expert_p = local_params(cfg, layout)
    grad_s = 0.0
    for params, members, stride, concurrent in (
        (dense_p, dp, t, t),
        (expert_p, world // ep, ep, min(ep, gpn)),
    ):
        if members <= 1:
            continue
        nodes = _group_nodes(range(0, members * stride, stride), gpn)
        bw = _allreduce_bw(hw, members, nodes, concurrent) * 1e9
        once = (members - 1) / members * pbytes * params / bw
        # ZeRO-2 reduce-scatters every micro-batch; ZeRO-1 once per step; then all-gather
        scatters = accum if layout.zero_stage >= 2 else 1
        lat = a.latency_inter_s if nodes > 1 else a.latency_intra_s
        grad_s += (scatters + 1) * once + (scatters + 1) * lat
    shards = dense_p / (dp if layout.zero_stage else 1) + expert_p / (
        world // ep if layout.zero_stage else 1
    )
    optim_s = 30 * shards / (hw.hbm_tbs * 1e12)  # fp32 master/m/v/grad read+write, bf16 out
    acc_s = _accumulate_s(cfg, accum, pbytes, dense_p + expert_p, hw)

    step = accum * micro + acc_s + grad_s + optim_s
    tokens_per_s = cfg.train.global_batch * m.seq_len / step
    return {
        "step": step,
        "accumulation": float(accum),
        "dense": accum * dense_s,
        "attention": accum * attn_s,
        "experts": accum * expert_s,
        "dispatch": accum * dispatch_s,
        "all_to_all": accum * a2a_s,
        "tensor_parallel": accum * tp_s,
        "grad_accumulate": acc_s,
        "grad_reduce": grad_s,
        "optimizer": optim_s,
        "tokens_per_s": tokens_per_s,
        "tflops_per_gpu": flops_per_token(cfg) * tokens_per_s / world / 1e12,
    }


def _accumulate_s(cfg: Any, accum: int, pbytes: int, params: float, hw: Hardware) -> float:
    """Summing the micro-batches' gradients, a memory-bound pass over every local gradient:
    in the model's dtype autograd adds each micro-batch's gradient after the first into
    `.grad` (read both, write one); with fp32 accumulation of bf16 gradients DeepSpeed's
    optimizer adds every micro-batch's into an fp32 buffer (read 2 + 4, write 4 bytes).
    On one H200 the bf16 sum over 3.9e9 parameters took 6 ms a micro-batch."""
    if cfg.train.grad_accum_dtype == "fp32" and pbytes == 2:
        return accum * 10 * params / (hw.hbm_tbs * 1e12)
    return (accum - 1) * 3 * pbytes * params / (hw.hbm_tbs * 1e12)


def _tensor_parallel_s(cfg: Any, layout: Layout, hw: Hardware, T: int, a: Assumptions) -> float:
    """TP traffic of one micro-batch under sequence parallelism: each attention or dense
    MLP block all-gathers the sequence on entry and reduce-scatters on exit, forward and
    (reversed) backward; recomputation repeats the forward pair. SSMB needs nothing (the
    block already holds its slice); plain TP gathers the sequence for the MoE block too.
    Then the replicated weights' gradients are summed over the TP group."""
    m, t = cfg.model, layout.tp
    act = ACT_BYTES * m.hidden * T
    bw = hw.allreduce_intra_gbs * 1e9
    one = (t - 1) / t * act / bw + a.latency_intra_s  # an all-gather or a reduce-scatter
    passes = 3 if layout.checkpointing else 2
    blocks = m.layers + m.dense_layers  # attention everywhere, dense MLPs where present
    moe_blocks = 0 if layout.ssmb else (m.layers - m.dense_layers)
    # replicated weights (embedding, head, norms, routers, shared experts) saw 1/t of the
    # tokens: their gradients are all-reduced over TP in every backward
    from xmoe.flops import param_counts

    p = param_counts(cfg)
    replicated = p["embedding"] + p["lm_head"] + p["norms"] + p["router"] + p["shared_experts"]
    grads = 2 * (t - 1) / t * ACT_BYTES * replicated / bw + a.latency_intra_s
    return (2 * blocks + moe_blocks) * passes * one + grads


def _all_to_all_s(
    cfg: Any, layout: Layout, hw: Hardware, moe_tokens: float, r: float, a: Assumptions
) -> float:
    """One dispatch (or combine) exchange of one MoE layer on the busiest GPU."""
    m, e = cfg.model, cfg.moe
    gpn, ep, k = hw.gpus_per_node, layout.ep, e.top_k
    row = ACT_BYTES * m.hidden
    local = min(ep, gpn)  # EP ranks on one node (EP blocks are consecutive ranks)
    ep_nodes = max(1, ep // gpn)
    rows = moe_tokens * k * r  # padded dispatchers: r is the capacity factor, buffers travel whole
    if _dedup(cfg, layout):  # one pilot per (token, destination rank), not per (token, k)
        rows = moe_tokens * expected_unique_nodes(e.num_experts, k, ep) * r
        if _fixed_slots(cfg, layout):  # a slot per (token, rank), whatever the routing
            rows = moe_tokens * ep
    intra_bytes = rows * (local - 1) / ep * row
    inter_bytes = rows * (ep - local) / ep * row
    count_exchange = a.latency_inter_s if ep_nodes > 1 else a.latency_intra_s
    if layout.dispatcher == "rbd" and ep_nodes > 1:
        # one pilot per (token, remote node) crosses; replicas fan out inside the node after
        remote = expected_unique_nodes(e.num_experts, k, ep_nodes) * (ep_nodes - 1) / ep_nodes
        inter = moe_tokens * remote * row / (hw.inter_gbs * 1e9)
        intra = rows * (local - 1) / local * row / (hw.intra_gbs * 1e9)
        return inter + intra + a.latency_inter_s + a.latency_intra_s + count_exchange
    intra = intra_bytes / (hw.intra_gbs * 1e9)
    inter = inter_bytes / (hw.inter_gbs * 1e9) if inter_bytes else 0.0
    lat = a.latency_inter_s if ep_nodes > 1 else a.latency_intra_s
    extra = a.latency_intra_s if layout.dispatcher == "rbd" else 0.0  # a second, empty stage
    return max(intra, inter) + lat + count_exchange + extra


def evaluate(cfg: Any, layout: Layout, hw: Hardware, world: int, a: Assumptions) -> Estimate:
    """Memory and time of `layout`; `reason` says why it does not fit, if it does not."""
    est = Estimate(layout)
    est.memory = memory_estimate(cfg, layout, hw, world, a)
    est.time = time_estimate(cfg, layout, hw, world, a)
    if est.needed_gib > hw.hbm_gib:
        est.reason = f"needs {est.needed_gib:.1f} GiB > {hw.hbm_gib:g} GiB HBM"
    return est
