"""Convolution modules: a drop-in ``nn.Conv2d`` and torchvision's ``Conv2dNormActivation`` block,
fused for inference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops._utils import pair
from ..ops.conv2d import check_activation

__all__ = ["Conv2d", "Conv2dNormActivation", "fuse_conv_bn"]


def _state_key(*tensors: Tensor | None) -> tuple:
    """Changes whenever one of ``tensors`` is replaced or modified in place: its storage address
    and version counter. Writes through ``.data`` bypass the version counter and go unseen."""
    return tuple((t.data_ptr(), t._version) for t in tensors if t is not None)


def _winograd_applies(conv: nn.Conv2d, weight: Tensor) -> bool:
    """Whether the CPU kernel may run ``conv`` as Winograd F(2x2, 3x3), so a prepacked transform
    of ``weight`` can serve it."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not torch.compiler.is_compiling()  # a traced graph keeps no per-module cache
    )


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by :func:`fastdl.ops.conv2d`: same arguments, parameters and
    state_dict (weights load both ways), plus an optional fused ``activation`` ("relu",
    "relu6", "silu", "gelu") and an optional ``residual`` argument of :meth:`forward`.
    ``padding_mode`` other than "zeros" pads with ``F.pad`` first.

    For CPU inference, :meth:`prepack` keeps the weight's Winograd transform between calls."""

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        check_activation(activation, "Conv2d")
        self.activation = activation
        self.prepacked = False
        self._winograd: tuple[tuple, Tensor] | None = None  # (state key of the weight, its transform)

    def prepack(self) -> "Conv2d":
        """Keep the weight's Winograd transform (:func:`fastdl.ops.conv2d_winograd_weight`) for
        eval-mode calls, so a 3x3 stride-1 float32 convolution on the CPU skips re-transforming
        it on every call (a fifth of the time of a 512-channel 7x7 layer). It costs 16/9 of the
        weight's memory and is recomputed when the weight is replaced or modified in place
        (``load_state_dict``, an optimizer step, ``.to()``); after writing through
        ``weight.data``, call ``prepack()`` again. Other convolutions are unaffected. Returns
        ``self``."""
        self.prepacked = True
        self._winograd = None
        return self

    def _winograd_weight(self, weight: Tensor) -> Tensor | None:
        if not self.prepacked or self.training or not _winograd_applies(self, weight):
            return None
        key = _state_key(weight)
        if self._winograd is None or self._winograd[0] != key:
            self._winograd = (key, ops.conv2d_winograd_weight(weight))
        return self._winograd[1]

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """``activation(conv(input) + residual)``: ``residual`` (a tensor of the output's shape,
        such as a ResNet block's shortcut) is added in the same pass, before the activation."""
        return self._conv_forward(input, self.weight, self.bias, residual)

    def _conv_forward(
        self, input: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None
    ) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return ops.conv2d(
            input,
            weight,
            bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            self.activation,
            residual=residual,
            winograd_weight=self._winograd_weight(weight),
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", activation={self.activation!r}" if self.activation else "")


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Weight and bias of ``bn(conv(x))`` with BatchNorm in eval mode, as one convolution:
    ``w' = w * gamma / sqrt(var + eps)`` per output channel, ``b' = (b - mean) * that + beta``."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("fuse_conv_bn: the BatchNorm2d must track running statistics")
    if bn.num_features != conv.out_channels:
        raise ValueError(
            f"fuse_conv_bn: conv has {conv.out_channels} output channels but bn has {bn.num_features} features"
        )
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    shift = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return conv.weight * scale.reshape(-1, 1, 1, 1), shift


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, activation: str | None = None) -> Conv2d:
    """One :class:`Conv2d` computing ``activation(bn(conv(x)))`` for inference (``bn`` in eval
    mode, its running statistics folded into the weight and bias), in a single output pass.
    The result is in eval mode and prepacked (:meth:`Conv2d.prepack`)."""
    fused = Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        activation=activation,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    weight, bias = _folded(conv, bn)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused.eval().prepack()


# The activation modules whose function the conv2d kernels apply in their epilogue.
_FUSABLE_ACTIVATIONS = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu"}


def _epilogue(activation: nn.Module | None) -> str | None | bool:
    """The kernel's name for ``activation`` (``None`` for none), or ``False`` where the kernels
    cannot apply it (another module, or GELU with the tanh approximation)."""
    if activation is None:
        return None
    if isinstance(activation, nn.GELU) and activation.approximate != "none":
        return False
    return _FUSABLE_ACTIVATIONS.get(type(activation), False)


class Conv2dNormActivation(nn.Sequential):
    """torchvision's ``Conv2dNormActivation``: conv -> norm -> activation as an ``nn.Sequential``
    with the same arguments, defaults and ``state_dict`` keys (``0.weight``, ``1.weight``,
    ``1.running_mean``, ...), the convolution a fastdl :class:`Conv2d`.

    ``padding=None`` is ``(kernel_size - 1) // 2 * dilation``; ``bias=None`` gives the
    convolution a bias only without a norm layer. In eval mode, when no parameter gradient is
    wanted (under ``torch.no_grad()``/``torch.inference_mode()``, or with frozen parameters), a
    ``BatchNorm2d`` is folded into the convolution and a ReLU, ReLU6, SiLU or GELU runs in its
    epilogue: one convolution writes the output. The folded weights (and, for a 3x3 stride-1
    float32 CPU convolution, their Winograd transform) are cached and recomputed when a
    parameter or running statistic is replaced or modified in place; writes through ``.data``
    are not seen, so call :meth:`refresh` after them. Other norm layers or activations run as
    separate modules.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str | None = None,
        groups: int = 1,
        norm_layer=nn.BatchNorm2d,
        activation_layer=nn.ReLU,
        dilation: int | tuple[int, int] = 1,
        inplace: bool | None = True,
        bias: bool | None = None,
        device=None,
        dtype=None,
    ):
        if padding is None:
            padding = tuple(
                (k - 1) // 2 * d for k, d in zip(pair(kernel_size, "kernel_size"), pair(dilation, "dilation"))
            )
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [
            Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                dilation,
                groups,
                bias=bias,
                device=device,
                dtype=dtype,
            )
        ]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels).to(device=device, dtype=dtype))
        if activation_layer is not None:
            layers.append(activation_layer() if inplace is None else activation_layer(inplace=inplace))
        super().__init__(*layers)
        self.out_channels = out_channels
        self._fused: tuple[tuple, Tensor, Tensor | None, Tensor | None] | None = None

    def refresh(self) -> "Conv2dNormActivation":
        """Drop the cached folded weights (needed only after writes through ``.data``)."""
        self._fused = None
        return self

    def _parts(self) -> tuple[Conv2d, nn.BatchNorm2d | None, str | None] | None:
        """The convolution, BatchNorm and epilogue activation of a block that can run as one
        convolution, else None."""
        conv, *rest = self
        if conv.padding_mode != "zeros":
            return None
        bn = rest.pop(0) if rest and isinstance(rest[0], nn.BatchNorm2d) and rest[0].running_mean is not None else None
        if len(rest) > 1:
            return None
        activation = _epilogue(rest[0]) if rest else None
        return None if activation is False else (conv, bn, activation)

    def _fused_parameters(self, conv: Conv2d, bn: nn.BatchNorm2d | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Folded weight, bias and (where it applies) the weight's Winograd transform."""
        tensors = (conv.weight, conv.bias) + ((bn.weight, bn.bias, bn.running_mean, bn.running_var) if bn else ())
        key = _state_key(*tensors)
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                weight, bias = _folded(conv, bn) if bn is not None else (conv.weight.detach(), conv.bias)
            winograd = ops.conv2d_winograd_weight(weight) if _winograd_applies(conv, weight) else None
            self._fused = (key, weight, bias, winograd)
        return self._fused[1:]

    def forward(self, x: Tensor) -> Tensor:
        needs_parameter_grads = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        parts = None if self.training or needs_parameter_grads else self._parts()
        if parts is None:
            return super().forward(x)
        conv, bn, activation = parts
        weight, bias, winograd = self._fused_parameters(conv, bn)
        return ops.conv2d(
            x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, activation, winograd_weight=winograd
        )
