"""SyncBatchNorm on CPU workers: two gloo ranks, each with half a batch, match one BatchNorm
over the whole batch, forward, backward and running statistics."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vitrail.launch import sync_batchnorm

SHAPES = {"2d": (8, 3, 5, 5), "1d": (8, 6)}


def _data(name):
    generator = torch.Generator().manual_seed(len(name))
    shape = SHAPES[name]
    inputs = torch.randn(shape, generator=generator) * 3 + 1
    loss_weights = torch.randn(shape, generator=generator)  # makes the loss depend on every output
    layer = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(shape[1])
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=generator)
        layer.bias.uniform_(-0.5, 0.5, generator=generator)
    return inputs, loss_weights, layer


def _train_steps(layer, inputs, loss_weights, steps=2):
    inputs = inputs.clone().requires_grad_(True)
    for _ in range(steps):  # two steps, so the running statistics average two batches
        out = layer(inputs)
    (out * loss_weights).sum().backward()
    return {"out": out.detach(), "input_grad": inputs.grad, "weight_grad": layer.weight.grad,
            "bias_grad": layer.bias.grad, "running_mean": layer.running_mean, "running_var": layer.running_var}


def _rank(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for name in SHAPES:
            inputs, loss_weights, layer = _data(name)
            half = slice(rank * 4, rank * 4 + 4)
            original, layer = layer, sync_batchnorm.convert(nn.Sequential(layer), torch.device("cpu"))[0]
            assert type(layer) is sync_batchnorm.CPUSyncBatchNorm
            # The same tensors, so an optimizer or EMA teacher built before the conversion still sees them.
            assert layer.weight is original.weight and layer.running_mean is original.running_mean
            torch.save(_train_steps(layer, inputs[half], loss_weights[half]), f"{out_dir}/{name}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_cpu_ranks_match_one_batchnorm_over_the_whole_batch(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_rank, args=(port, str(tmp_path)), nprocs=2)
    for name in SHAPES:
        inputs, loss_weights, layer = _data(name)
        reference = _train_steps(layer, inputs, loss_weights)
        ranks = [torch.load(tmp_path / f"{name}-{rank}.pt") for rank in range(2)]
        for key in ("out", "input_grad"):
            torch.testing.assert_close(torch.cat([ranks[0][key], ranks[1][key]]), reference[key])
        for key in ("weight_grad", "bias_grad"):  # each rank holds its half's share; DDP sums them
            torch.testing.assert_close(ranks[0][key] + ranks[1][key], reference[key])
        for key in ("running_mean", "running_var"):
            assert torch.equal(ranks[0][key], ranks[1][key])
            torch.testing.assert_close(ranks[0][key], reference[key])
        # Without synchronisation a half is normalised by its own statistics: not what rank 0 got.
        _, _, plain = _data(name)
        alone = _train_steps(plain, inputs[:4], loss_weights[:4])
        assert not torch.allclose(alone["out"], ranks[0]["out"], atol=1e-2)
