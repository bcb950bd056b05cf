"""``nn.LayerNorm`` on :func:`fastdl.ops.layer_norm`, with the residual add fused."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops

__all__ = ["LayerNorm"]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed by :func:`fastdl.ops.layer_norm`: same arguments, parameters and
    state_dict. ``forward(input, residual)`` normalises ``input + residual`` and returns
    ``(normalized, input + residual)`` from one pass (a pre-norm transformer's residual stream)."""

    def forward(self, input: Tensor, residual: Tensor | None = None):
        return ops.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual)
