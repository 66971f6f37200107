"""Exponential moving average of a student into a teacher (mean teacher, BYOL / DINO)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    teacher_params = [p for p in teacher.parameters()]
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def start_teacher(student: nn.Module, teacher: nn.Module) -> nn.Module:
    """`teacher` (the same network as `student`, built without stochastic depth) set to the
    student's weights and out of the gradient: how DINO, iBOT and DINOv2 start theirs."""
    teacher.load_state_dict(student.state_dict())
    for parameter in teacher.parameters():
        parameter.requires_grad = False
    return teacher
