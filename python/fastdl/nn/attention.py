"""Attention modules backed by :func:`fastdl.ops.attention`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from . import functional as FA

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention`` using fused attention.

    Same constructor arguments and defaults (``batch_first=False``: inputs ``[N, B, E]``, or
    ``[B, N, E]`` with ``batch_first=True``, or unbatched ``[N, E]``), same parameters and
    ``state_dict`` keys (``in_proj_weight`` or ``q/k/v_proj_weight``, ``in_proj_bias``,
    ``bias_k``/``bias_v`` with ``add_bias_kv``, ``out_proj.weight``, ``out_proj.bias``) and the
    same initialisation, so weights load either way. ``key_padding_mask`` (``[B, Nk]``, ``True`` =
    pad) and ``attn_mask`` (``[Nq, Nk]`` or ``[B * heads, Nq, Nk]``, boolean ``True`` = not
    allowed, or floating and added) follow torch's conventions; ``add_bias_kv`` appends the
    learned ``bias_k``/``bias_v`` to the keys and values and ``add_zero_attn`` a zero key and
    value, both visible to every query, as torch does.

    ``need_weights=True`` (torch's default) also returns the attention weights, after dropout,
    averaged over heads unless ``average_attn_weights=False`` (then ``[B, heads, Nq, Nk]``); they
    are computed explicitly, O(Nq * Nk) memory, as torch does on that path. With
    ``need_weights=False`` the fused kernel runs and the second value is ``None``. ``is_causal``
    applies a causal mask when ``attn_mask`` is not given (torch requires the mask and treats the
    flag as a hint; given both, the mask is used). Difference: a query that may see no key
    returns zeros (and zero weights) instead of NaN.
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
        batch_first: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"embed_dim and num_heads must be positive, got embed_dim={embed_dim} and num_heads={num_heads}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.batch_first = batch_first
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
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
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
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _extra_keys(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, int]:
        """``bias_k``/``bias_v`` and the zero key/value appended to ``Tensor[B, heads, Nk, D]``
        keys and values, and how many keys were added."""
        b, h, _, d = k.shape
        extra_k, extra_v = [], []
        if self.bias_k is not None:
            extra_k.append(self.bias_k.reshape(1, h, 1, d).expand(b, h, 1, d).to(k.dtype))
            extra_v.append(self.bias_v.reshape(1, h, 1, d).expand(b, h, 1, d).to(v.dtype))
        if self.add_zero_attn:
            extra_k.append(k.new_zeros(b, h, 1, d))
            extra_v.append(v.new_zeros(b, h, 1, d))
        if not extra_k:
            return k, v, 0
        return torch.cat([k, *extra_k], dim=2), torch.cat([v, *extra_v], dim=2), len(extra_k)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, nq, nk = query.size(0), query.size(1), key.size(1)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        q, k, v = FA.in_projection(query, key, value, self.num_heads, wq, wk, wv, self.in_proj_bias)
        k, v, added = self._extra_keys(k, v)
        causal = is_causal and attn_mask is None
        if causal and (added or nq != nk):  # torch's causal mask is top-left aligned over the real keys
            attn_mask = torch.ones(nq, nk, dtype=torch.bool, device=query.device).triu(1)
            causal = False
        if added:  # the added keys are visible to every query
            if attn_mask is not None:
                attn_mask = torch.nn.functional.pad(attn_mask, (0, added))
            if key_padding_mask is not None:
                key_padding_mask = torch.nn.functional.pad(key_padding_mask, (0, added))
        mask = FA.merge_masks(attn_mask, key_padding_mask, batch, self.num_heads, nq, nk + added)
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            weights = torch.nn.functional.dropout(FA.attention_probabilities(q, k, mask, causal), dropout_p)
            heads = weights @ v
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        else:
            heads = ops.attention(q, k, v, causal=causal, attn_mask=mask, dropout_p=dropout_p)
        out = FA.out_projection(heads, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, batch_first={self.batch_first}"
