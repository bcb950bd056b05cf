"""BatchNorm over the global batch of a distributed run, on any device.

``torch.nn.SyncBatchNorm`` computes its statistics with CUDA-only kernels and refuses CPU
tensors. :class:`GlobalBatchNorm2d` does the same job with two differentiable all-reduces: the
sum of the inputs (with the count), then the sum of their squared deviations from the global
mean. The backward pass all-reduces the gradients of those
sums, so every process gets the gradient of the global loss. It subclasses ``nn.BatchNorm2d``:
the state_dict, ``fastdl.models.fuse_for_inference`` and eval mode are those of BatchNorm2d.

Outside a process group (one process) the same arithmetic runs without the all-reduces, so a
single-process run and a distributed one compute the same statistics up to the order of the
additions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["GlobalBatchNorm2d", "convert_batchnorm"]


class _AllReduceSum(torch.autograd.Function):
    """The sum over the processes; its gradient is the sum of the processes' gradients (each
    process's loss depends on every process's input through the shared statistics)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        total = grad.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _AllReduceSum.apply(tensor)
    return tensor


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics cover every process's share of the batch."""

    def forward(self, input: Tensor) -> Tensor:
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.size(1)
        dims = (0, 2, 3)
        local_count = torch.tensor([input.numel() // channels], dtype=input.dtype, device=input.device)
        sums = _all_reduce_sum(torch.cat([input.sum(dims), local_count]))
        count = sums[channels].detach()
        if count.item() < 2:
            raise ValueError(
                f"GlobalBatchNorm2d: expected more than 1 value per channel over the batch, got {int(count)}"
            )
        mean = sums[:channels] / count
        centred = input - mean.view(1, -1, 1, 1)
        var = _all_reduce_sum((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        out = centred * scale.view(1, -1, 1, 1)
        return out + self.bias.view(1, -1, 1, 1) if self.affine else out

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.item() if self.momentum is None else self.momentum
        unbiased = var * (count / (count - 1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.BatchNorm2d`` replaced by a :class:`GlobalBatchNorm2d` that
    keeps its parameters and buffers (in place for children; returns the new root if the root
    itself is a BatchNorm2d)."""
    if type(module) is nn.BatchNorm2d:
        converted = GlobalBatchNorm2d(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=module.running_mean.device if module.running_mean is not None else None,
        )
        converted.load_state_dict(module.state_dict())
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        replacement = convert_batchnorm(child)
        if replacement is not child:
            setattr(module, name, replacement)
    return module
