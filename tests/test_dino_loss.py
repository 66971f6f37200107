import math

import torch

from vitrail.ssl.dino import DINOLoss


def _direct_loss(student, teacher, center, student_temp, teacher_temp):
    """Eq. 3 of the paper written out term by term with plain exp/log."""
    terms = []
    for t_index, t in enumerate(teacher):
        for s_index, s in enumerate(student):
            if s_index == t_index:
                continue
            for row in range(t.shape[0]):
                q = torch.exp((t[row] - center[0]) / teacher_temp)
                q = q / q.sum()
                log_p = s[row] / student_temp - torch.log(torch.exp(s[row] / student_temp).sum())
                terms.append((row, -(q * log_p).sum()))
    pairs = len(teacher) * len(student) - len(teacher)
    return sum(value for _, value in terms) / (pairs * teacher[0].shape[0])


def test_loss_matches_direct_formula_and_center_updates():
    generator = torch.Generator().manual_seed(0)
    out_dim, batch = 32, 6
    student = [torch.randn(batch, out_dim, generator=generator, dtype=torch.float64) for _ in range(5)]
    teacher = [torch.randn(batch, out_dim, generator=generator, dtype=torch.float64) for _ in range(2)]
    loss_fn = DINOLoss(out_dim, student_temp=0.1, center_momentum=0.9).double()
    loss_fn.center.copy_(torch.randn(1, out_dim, generator=generator, dtype=torch.float64))
    center_before = loss_fn.center.clone()

    loss = loss_fn([s.float() for s in student], [t.float() for t in teacher], teacher_temp=0.04)
    expected = _direct_loss(student, teacher, center_before, 0.1, 0.04)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-4)

    batch_mean = torch.cat(teacher).mean(dim=0, keepdim=True)
    assert torch.allclose(loss_fn.center, 0.9 * center_before + 0.1 * batch_mean, atol=1e-5)


def test_loss_gradient_flows_to_student_only():
    loss_fn = DINOLoss(8)
    student = [torch.randn(3, 8, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(3, 8, requires_grad=True) for _ in range(2)]
    loss_fn(student, teacher, teacher_temp=0.07).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)


def test_uniform_outputs_give_log_out_dim():
    # Identical constant logits: teacher and student are uniform, the loss is ln(K).
    loss_fn = DINOLoss(100)
    constant = [torch.zeros(4, 100) for _ in range(4)]
    assert math.isclose(loss_fn(constant, constant[:2], 0.04).item(), math.log(100), rel_tol=1e-6)
