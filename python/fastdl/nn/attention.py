"""Attention modules backed by :func:`fastdl.ops.attention`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as FA

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention(..., batch_first=True)`` using fused attention.

    Same constructor arguments (``add_bias_kv`` and ``add_zero_attn`` are not supported), same
    parameters and ``state_dict`` keys (``in_proj_weight`` or ``q/k/v_proj_weight``,
    ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``), so weights load either way. Inputs are
    ``[B, N, E]`` (or unbatched ``[N, E]``); ``key_padding_mask`` (``[B, Nk]``, ``True`` = pad) and
    ``attn_mask`` (``[Nq, Nk]`` or ``[B * heads, Nq, Nk]``, boolean ``True`` = not allowed, or
    floating and added) follow torch's conventions; ``is_causal=True`` applies a causal mask.

    ``need_weights`` defaults to ``False`` here: the fused kernel never materialises the weights
    and the second returned value is ``None``. With ``need_weights=True`` the weights are
    computed explicitly (O(Nq * Nk) memory, as torch does on that path) and returned like torch's:
    after dropout, averaged over heads unless ``average_attn_weights=False`` (then
    ``[B, heads, Nq, Nk]``). Difference: a query that may see no key returns zeros (and zero
    weights) instead of NaN.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("fastdl.nn.MultiheadAttention: add_bias_kv and add_zero_attn are not supported")
        if not batch_first:
            raise ValueError("fastdl.nn.MultiheadAttention is batch-first only (batch_first=True)")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.batch_first = True
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self):
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            q, k, v = FA.in_projection(query, key, value, self.num_heads, wq, wk, wv, self.in_proj_bias)
            mask = FA.merge_masks(attn_mask, key_padding_mask, query.size(0), self.num_heads, query.size(1), key.size(1))
            weights = torch.nn.functional.dropout(FA.attention_probabilities(q, k, mask, is_causal), dropout_p)
            out = FA.out_projection(weights @ v, self.out_proj.weight, self.out_proj.bias)
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        else:
            out = FA.multi_head_attention(
                query, key, value, self.num_heads, wq, wk, wv, self.in_proj_bias,
                self.out_proj.weight, self.out_proj.bias,
                key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=is_causal, dropout_p=dropout_p,
            )
        return (out.squeeze(0) if unbatched else out), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}"
