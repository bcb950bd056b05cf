"""Drop-in ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` backed by :mod:`fastdl.ops.lstm`.

Both subclass torch's modules, so parameters, initialisation, ``state_dict`` keys
(``weight_ih_l0``, ``weight_hh_l0_reverse``, ``weight_hr_l0``, ...) and ``flatten_parameters``
are torch's own and weights load either way; only ``forward`` runs fastdl's kernels.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .. import ops

__all__ = ["LSTM", "LSTMCell"]


class LSTMCell(nn.LSTMCell):
    """``torch.nn.LSTMCell`` computed by the fused :func:`fastdl.ops.lstm_cell`.

    ``forward(input [B, I] or [I], hx=(h [B, H], c [B, H]) or None) -> (h_new, c_new)``.
    """

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(
                f"LSTMCell: expected input to be 1-D or 2-D, got {input.dim()}-D of shape {list(input.shape)}"
            )
        if input.size(-1) != self.input_size:
            raise ValueError(f"LSTMCell: input has {input.size(-1)} features, expected input_size={self.input_size}")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if hx is None:
            h = c = x.new_zeros(x.size(0), self.hidden_size)
        else:
            h, c = hx
            expected = (x.size(0), self.hidden_size) if batched else (self.hidden_size,)
            for name, state in (("h", h), ("c", c)):
                if tuple(state.shape) != expected:
                    raise ValueError(f"LSTMCell: expected {name} of shape {expected}, got {tuple(state.shape)}")
            if not batched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        h_new, c_new = ops.lstm_cell(x, h, c, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return (h_new, c_new) if batched else (h_new.squeeze(0), c_new.squeeze(0))


class LSTM(nn.LSTM):
    """``torch.nn.LSTM`` computed by :func:`fastdl.ops.lstm`.

    Same constructor (``num_layers``, ``bias``, ``batch_first``, ``dropout``, ``bidirectional``,
    ``proj_size``), same inputs and outputs: ``forward(input, hx=None)`` with ``input`` a padded
    tensor or a ``PackedSequence`` returns ``(output, (h_n, c_n))``. Extra: ``lengths`` (one per
    sequence) for padded input runs each sequence only over its length, as packing would.
    """

    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None, lengths=None):
        return ops.lstm(
            input,
            self._flat_weights,
            hx,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            bias=self.bias,
            proj_size=self.proj_size,
            dropout=self.dropout,
            training=self.training,
            batch_first=self.batch_first,
            lengths=lengths,
        )
