"""Decoder-only DeepSeek-MoE transformer, readable top to bottom.

tokens -> embedding -> [RMSNorm -> causal RoPE attention -> RMSNorm -> (dense MLP | MoE)]
x layers -> RMSNorm -> LM head. The first `dense_layers` layers use a dense SwiGLU MLP;
the rest are MoE blocks (routed experts + shared experts). Shapes: B batch, S sequence,
D model dim, H heads, Dh head dim, V vocabulary.

With tensor parallelism (tp > 1, `xmoe.parallel.tensor_parallel`) the residual stream,
the norms, the MoE blocks (SSMB) and the LM head work on this TP rank's contiguous 1/tp
of the flattened B*S tokens ([T, D] rows, T = B*S/tp); attention (heads split) and the
dense MLPs (hidden units split) gather the full sequence and reduce-scatter their output.
tp = 1 runs the plain [B, S, D] code below unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from xmoe.config import Config
from xmoe.kernels.cross_entropy import linear_cross_entropy
from xmoe.kernels.rmsnorm import rms_norm
from xmoe.kernels.rope import rope_qkv
from xmoe.moe.experts import DenseMLP
from xmoe.moe.layer import MoELayer
from xmoe.parallel.tensor_parallel import (
    TPGroup,
    column_parallel_,
    gather_replicated,
    gather_sequence,
    mark_experts_for_grad_norm,
    reduce_from_tp,
    reduce_scatter_sequence,
    row_parallel_,
    sum_grads_over_tp,
)


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 for stability under bf16: one kernel each
    way, keeping the input and 1/rms per row for backward (`xmoe.kernels.rmsnorm`)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [S, Dh/2] in fp32, built once per shape and device (kept here, not
    as module buffers: engines cast float buffers to bf16)."""
    key = (seq_len, head_dim, float(theta), torch.device(device))
    if key not in _ROPE_TABLES:
        inv_freq = 1.0 / theta ** (
            torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
        )
        angles_SF = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
        _ROPE_TABLES[key] = (angles_SF.cos(), angles_SF.sin())
    return _ROPE_TABLES[key]


class Attention(nn.Module):
    """Multi-head causal self-attention through `scaled_dot_product_attention`."""

    def __init__(self, cfg: Config, tp: TPGroup | None = None) -> None:
        super().__init__()
        m = cfg.model
        self.heads = m.heads
        self.head_dim = m.hidden // m.heads
        self.theta = m.rope_theta
        self.wqkv = nn.Linear(m.hidden, 3 * m.hidden, bias=False)
        self.wo = nn.Linear(m.hidden, m.hidden, bias=False)
        for p in self.parameters():
            nn.init.normal_(p, std=m.init_std)
        if tp is not None:  # this rank's heads: QKV column-parallel, output row-parallel
            self.heads //= tp.size
            column_parallel_(self.wqkv, tp, blocks=3)
            row_parallel_(self.wo, tp)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        qkv = self.wqkv(x_BSD).view(B, S, 3, self.heads, self.head_dim)
        cos, sin = rope_tables(S, self.head_dim, self.theta, x_BSD.device)
        # q and k rotated, v beside them, in one pass: each [B, S, H, Dh]
        q, k, v = (t.transpose(1, 2) for t in rope_qkv(qkv, cos, sin))  # [B, H, S, Dh]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.heads * self.head_dim))


class Block(nn.Module):
    """One pre-norm transformer layer; its feed-forward part is dense or MoE."""

    def __init__(self, cfg: Config, layer_idx: int, parallel_state: Any = None) -> None:
        super().__init__()
        m = cfg.model
        self.tp = TPGroup.from_state(parallel_state)
        self.attn_norm = RMSNorm(m.hidden, m.norm_eps)
        self.attn = Attention(cfg, self.tp)
        self.ffn_norm = RMSNorm(m.hidden, m.norm_eps)
        self.is_moe = layer_idx >= m.dense_layers
        if self.is_moe:
            self.ffn: nn.Module = MoELayer(cfg, parallel_state, layer_idx)
        else:
            self.ffn = DenseMLP(m.hidden, m.ffn_hidden, "swiglu", m.init_std)
            if self.tp is not None:
                column_parallel_(self.ffn.w1, self.tp)
                column_parallel_(self.ffn.w3, self.tp)
                row_parallel_(self.ffn.w2, self.tp)

    def forward(self, x_BSD: torch.Tensor, seq_len: int = 0) -> torch.Tensor:
        if self.tp is not None:
            return self._forward_sequence_parallel(x_BSD, seq_len)
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD))
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))

    def _forward_sequence_parallel(self, x_TD: torch.Tensor, seq_len: int) -> torch.Tensor:
        """x_TD: this TP rank's rows of the B*S tokens; the MoE block stays on them (SSMB)."""
        tp = self.tp
        h_TD = gather_sequence(self.attn_norm(x_TD), tp)
        a_TD = self.attn(h_TD.view(-1, seq_len, h_TD.shape[-1])).reshape(h_TD.shape)
        x_TD = x_TD + reduce_scatter_sequence(a_TD, tp)
        h_TD = self.ffn_norm(x_TD)
        if self.is_moe:
            return x_TD + self.ffn(h_TD)
        return x_TD + reduce_scatter_sequence(self.ffn(gather_sequence(h_TD, tp)), tp)


@dataclass
class LossParts:
    """Components of the training loss, detached, for logging."""

    lm_loss: torch.Tensor
    aux_loss: torch.Tensor  # mean over MoE layers of the unscaled balance loss (1.0 = balanced)
    z_loss: torch.Tensor  # mean over MoE layers of the unscaled router z-loss


class Transformer(nn.Module):
    """The whole model: `forward(tokens)` gives logits, `forward(tokens, targets)` the loss."""

    def __init__(self, cfg: Config, parallel_state: Any = None) -> None:
        super().__init__()
        m = cfg.model
        self.cfg = cfg
        self.tp = TPGroup.from_state(parallel_state)
        self.embed = nn.Embedding(m.vocab_size, m.hidden)
        nn.init.normal_(self.embed.weight, std=m.init_std)
        self.layers = nn.ModuleList(Block(cfg, i, parallel_state) for i in range(m.layers))
        self.norm = RMSNorm(m.hidden, m.norm_eps)
        self.head = nn.Linear(m.hidden, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=m.init_std)
        if self.tp is not None:
            # replicated weights see 1/tp of the tokens: their gradients sum over TP
            sum_grads_over_tp(self, self.tp)
            mark_experts_for_grad_norm(self)

    def moe_layers(self) -> list[MoELayer]:
        return [blk.ffn for blk in self.layers if blk.is_moe]

    def forward(
        self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, LossParts]:
        if targets_BS is not None:
            return self.loss(tokens_BS, targets_BS)
        return self.logits(tokens_BS)

    def logits(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        logits = self._local_logits(tokens_BS)
        if self.tp is None:
            return logits
        return gather_replicated(logits, self.tp).view(*tokens_BS.shape, -1)

    def _local_logits(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """[B, S, V]; with tp > 1 [T, V] for this TP rank's rows of the B*S tokens."""
        return self.head(self._local_hidden(tokens_BS))

    def _local_hidden(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        """The final norm's output, [B, S, D] (with tp > 1 [T, D]), which the head reads."""
        S = tokens_BS.shape[1]
        if self.tp is None:
            x = self.embed(tokens_BS)
        else:
            x = self.embed(tokens_BS.reshape(-1)[self.tp.rows(tokens_BS.numel())])
        for blk in self.layers:
            if self.cfg.train.activation_checkpointing and self.training:
                x = checkpoint(blk, x, S, use_reentrant=False)
            else:
                x = blk(x, S)
        return self.norm(x)

    def loss(
        self, tokens_BS: torch.Tensor, targets_BS: torch.Tensor
    ) -> tuple[torch.Tensor, LossParts]:
        """Next-token cross-entropy plus the router losses.

        total = lm + aux_coef * sum_l aux_l + z_coef * sum_l z_l (per-layer terms summed,
        as Switch/ST-MoE do); the logged aux/z are layer means of the unscaled terms.
        """
        h = self._local_hidden(tokens_BS)
        targets_T = targets_BS.reshape(-1)
        if self.tp is not None:  # this rank's rows: its share of the mean over all B*S
            targets_T = targets_T[self.tp.rows(targets_BS.numel())]
        h_TD = h.reshape(-1, h.shape[-1])
        if self.cfg.model.fused_lm_loss:
            lm = linear_cross_entropy(h_TD, self.head.weight, targets_T, 1 / targets_BS.numel())
        else:
            logits = self.head(h_TD)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            lm = F.cross_entropy(logits, targets_T, reduction="sum") / targets_BS.numel()
        total = lm
        moe = self.moe_layers()
        zero = lm.detach() * 0.0
        aux_mean, z_mean = zero, zero
        if moe:
            aux = torch.stack([layer.last_aux_loss for layer in moe])
            z = torch.stack([layer.last_z_loss for layer in moe])
            e = self.cfg.moe
            total = lm + e.aux_loss_coef * aux.sum() + e.z_loss_coef * z.sum()
            # logged in the LM loss's dtype (fp32; fp64 in an fp64 model)
            aux_mean, z_mean = (v.detach().mean().to(lm.dtype) for v in (aux, z))
        if self.tp is not None:  # add up the TP ranks' shares (backward: each its own)
            summed = reduce_from_tp(torch.stack([total, lm.detach(), aux_mean, z_mean]), self.tp)
            total, (lm, aux_mean, z_mean) = summed[0], summed[1:].detach()
        return total, LossParts(lm.detach(), aux_mean, z_mean)
