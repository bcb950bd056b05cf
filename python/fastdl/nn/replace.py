"""Swap torch's modules for fastdl's drop-ins inside any model."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..ops.attention import SUPPORTED_HEAD_DIMS
from .attention import MultiheadAttention
from .conv import Conv2d
from .recurrent import LSTM

__all__ = ["replace_modules"]

# dtypes fastdl's convolution kernels compute; other device types run its plain-PyTorch composite
_CONV_DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
}


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def _conv_replacement(conv: nn.Conv2d) -> tuple[nn.Module | None, str]:
    supported = _CONV_DTYPES.get(conv.weight.device.type)
    if supported is not None and conv.weight.dtype not in supported:
        return None, f"dtype {conv.weight.dtype} on {conv.weight.device.type}"
    return Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
    ), ""


def _lstm_replacement(lstm: nn.LSTM) -> tuple[nn.Module | None, str]:
    return LSTM(
        lstm.input_size,
        lstm.hidden_size,
        lstm.num_layers,
        bias=lstm.bias,
        batch_first=lstm.batch_first,
        dropout=lstm.dropout,
        bidirectional=lstm.bidirectional,
        proj_size=lstm.proj_size,
        device="meta",
    ), ""


def _attention_replacement(attention: nn.MultiheadAttention) -> tuple[nn.Module | None, str]:
    if attention.head_dim not in SUPPORTED_HEAD_DIMS:
        return None, f"head dim {attention.head_dim} (the kernels take multiples of 8 from 8 to 256)"
    return MultiheadAttention(
        attention.embed_dim,
        attention.num_heads,
        attention.dropout,
        bias=attention.in_proj_bias is not None,
        add_bias_kv=attention.bias_k is not None,
        add_zero_attn=attention.add_zero_attn,
        kdim=attention.kdim,
        vdim=attention.vdim,
        batch_first=attention.batch_first,
        device="meta",
    ), ""


# exact types: a subclass of these may change forward, so it is kept
_REPLACEMENTS = {
    nn.Conv2d: _conv_replacement,
    nn.LSTM: _lstm_replacement,
    nn.MultiheadAttention: _attention_replacement,
}


def _replacement(module: nn.Module) -> tuple[nn.Module | None, str]:
    """fastdl's module holding ``module``'s very parameters, or (None, why it is kept)."""
    if _has_hooks(module):
        return None, "it has hooks, which a new module would not carry"
    new, reason = _REPLACEMENTS[type(module)](module)
    if new is None:
        return None, reason
    # assign=True moves module's Parameter objects themselves into the module built on "meta":
    # same values, device and dtype, and an optimizer built before still holds them. It sets their
    # requires_grad to the receiving module's, so that is copied over first.
    originals = dict(module.named_parameters())
    for name, parameter in new.named_parameters():
        parameter.requires_grad_(originals[name].requires_grad)
    new.load_state_dict(module.state_dict(keep_vars=True), strict=True, assign=True)
    return new.train(module.training), ""


def replace_modules(model: nn.Module) -> nn.Module:
    """Replace, in place, every ``nn.Conv2d``, ``nn.LSTM`` and ``nn.MultiheadAttention`` inside
    ``model`` by :class:`fastdl.nn.Conv2d`, :class:`fastdl.nn.LSTM` and
    :class:`fastdl.nn.MultiheadAttention`, and return ``model`` (or the replacement, when
    ``model`` itself is one of these modules).

    The replacement takes over the original's Parameter objects (loaded with
    ``load_state_dict(strict=True, assign=True)``), so values, device, dtype and
    ``requires_grad`` stay, state_dict keys stay, and an optimizer created earlier keeps
    training the same tensors. A module shared by several parents is replaced by one shared
    module. Calling it again changes nothing: fastdl's modules are not replaced.

    Kept as they are (a warning lists them, with the reason):

    - subclasses of these three classes (their ``forward`` may differ), including
      parametrized modules;
    - an ``nn.Conv2d`` whose dtype fastdl's convolution does not compute on its device
      (e.g. complex, or float64 on CUDA);
    - an ``nn.MultiheadAttention`` whose head dim (``embed_dim / num_heads``) is not a multiple
      of 8 from 8 to 256, the head dims fastdl's attention kernels take;
    - a module with hooks registered on it (forward, forward-pre, backward): the new module
      would not carry them.
    """
    replaced: dict[int, nn.Module] = {}
    kept: dict[int, str] = {}

    def swap(module: nn.Module, name: str) -> nn.Module:
        if type(module) not in _REPLACEMENTS:
            if isinstance(module, tuple(_REPLACEMENTS)) and not isinstance(module, (Conv2d, LSTM)):
                kept[id(module)] = f"{name or type(module).__name__} ({type(module).__name__}): a subclass"
            return module
        key = id(module)
        if key not in replaced and key not in kept:
            new, reason = _replacement(module)
            if new is None:
                kept[key] = f"{name or type(module).__name__} ({type(module).__name__}): {reason}"
            else:
                replaced[key] = new
        return replaced.get(key, module)

    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if child is not None:
                setattr(parent, child_name, swap(child, f"{parent_name}.{child_name}".lstrip(".")))
    model = swap(model, "")
    if kept:
        warnings.warn("replace_modules kept these modules: " + "; ".join(kept.values()), stacklevel=2)
    return model
