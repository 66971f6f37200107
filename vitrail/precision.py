"""Mixed precision: which autocast a run uses, and the pieces kept in float32 whatever the device.

`run.precision` is fp32, bf16, or auto: bf16 autocast on CUDA and on CPUs with bf16 matrix
units (AMX), fp32 elsewhere (`vitrail.hardware.cpu_has_bf16_matrix_units`).

CUDA autocast runs layer_norm, norms, softmax and cross-entropy in float32, and cuDNN's batch
norm accumulates its statistics in float32; the official DINO and iBOT code rely on that under
`torch.cuda.amp`. CPU autocast (torch 2.14) keeps layer_norm and batch_norm in bf16 when their
input is bf16, and the kernel it picks depends on the CPU (oneDNN on AVX-512 and AMX parts, the
generic one elsewhere): on a Xeon with AMX a bf16 Conformer step gave a NaN loss. So every
normalisation layer gets its input in float32 (`float32_norms`), on every device, which makes
the CPU path compute what the GPU path computes. The losses cast their logits to float32
themselves (`.float()` before every softmax in `vitrail/ssl/`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vitrail.hardware import CPUINFO, cpu_has_bf16_matrix_units

_NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)


def uses_bf16(precision: str, device: torch.device, cpuinfo: Path = CPUINFO) -> bool:
    """Whether `run.precision` means bf16 autocast on `device` (a CPU described by `cpuinfo`)."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_matrix_units(cpuinfo))
    return precision == "bf16"


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _float32_inputs(layer: nn.Module, inputs: tuple) -> tuple:
    return tuple(x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs)


def float32_norms(model: nn.Module) -> nn.Module:
    """Feed every LayerNorm, GroupNorm and BatchNorm of `model` float32 inputs (a no-op outside
    autocast), so their statistics never accumulate in bf16; their outputs stay float32, as under
    CUDA autocast, until the next matrix product casts them. Idempotent; returns `model`."""
    for layer in model.modules():
        if isinstance(layer, _NORM_LAYERS) and not hasattr(layer, "_vitrail_float32_hook"):
            layer._vitrail_float32_hook = layer.register_forward_pre_hook(_float32_inputs)
    return model
