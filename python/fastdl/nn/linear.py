"""``nn.Linear`` on :func:`fastdl.ops.linear`."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ops

__all__ = ["Linear"]


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`fastdl.ops.linear`: same arguments, parameters and
    state_dict. Few input rows (decoding) take fastdl's weight-streaming CPU kernel."""

    def forward(self, input: Tensor) -> Tensor:
        return ops.linear(input, self.weight, self.bias)
