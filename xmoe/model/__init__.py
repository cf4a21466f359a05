"""The DeepSeek-MoE transformer."""

from xmoe.model.transformer import Transformer

__all__ = ["Transformer"]
