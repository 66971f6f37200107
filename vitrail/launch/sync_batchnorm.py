"""Batch norm over the global batch of every DDP worker, on GPUs and on the CPU.

On GPUs this is torch's `nn.SyncBatchNorm`. On the CPU torch has none: `nn.SyncBatchNorm`
computes its statistics with device kernels and raises on CPU tensors, and DDP refuses any
module holding one ("SyncBatchNorm layers only work with GPU modules", torch 2.14). CPU workers
under gloo would then each normalise their own slice of the batch, so `CPUSyncBatchNorm`
all-reduces the per-channel sums itself; autograd differentiates through the all-reduce, so the
gradient reaches every worker's input as in torch's own backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks. Every rank's output depends on every rank's input, so the gradients of
    all ranks' outputs are summed on the way back too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(_BatchNorm):
    """BatchNorm*d whose training-mode statistics span all ranks; the parameters, buffers and
    state-dict keys of the layer it replaces. Outside training or a process group, plain BN."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a (B, C, *) input, got {x.dim()} dimensions")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcasts (C,) over (B, C, *)
        dims = [0, *range(2, x.dim())]  # every dim but the channels
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype)
        totals = _AllReduceSum.apply(torch.cat([x.sum(dims), count]))
        count = totals[-1].detach()
        mean = totals[:-1] / count
        centred = x - mean.view(shape)
        # Two passes (mean, then squared deviations): E[x^2] - E[x]^2 cancels badly in float32.
        var = _AllReduceSum.apply(centred.square().sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            self._update_running_stats(mean.detach(), var.detach() * count / (count - 1).clamp(min=1))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None means a cumulative average, as in nn.BatchNorm.
        momentum = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean, momentum)
        self.running_var.lerp_(unbiased_var, momentum)


def convert(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` with its BatchNorm*d layers synchronised across ranks, keeping their parameters,
    buffers and state-dict keys (checkpoints still load into an unconverted model)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _cpu_sync(module)


def _cpu_sync(module: nn.Module) -> nn.Module:
    """As torch's `convert_sync_batchnorm`: each BatchNorm becomes a new layer holding the same
    parameter and buffer tensors, so an optimizer or EMA built over the model still sees them."""
    converted = module
    if isinstance(module, _BatchNorm):
        converted = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _cpu_sync(child))
    return converted
