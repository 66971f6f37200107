import torch

from vitrail.hardware import cpu_flags, cpu_has_bf16_matrix_units
from vitrail.precision import uses_bf16

XEON_WITHOUT_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_fp16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
XEON_WITH_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


def test_bf16_autocast_on_the_cpu_needs_amx_not_just_avx512_bf16(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(XEON_WITHOUT_AMX)
    assert "avx512_bf16" in cpu_flags(cpuinfo) and not cpu_has_bf16_matrix_units(cpuinfo)
    cpuinfo.write_text(XEON_WITH_AMX)
    assert cpu_has_bf16_matrix_units(cpuinfo)
    assert cpu_flags(tmp_path / "missing") == set() and not cpu_has_bf16_matrix_units(tmp_path / "missing")


def test_precision_auto_follows_the_device_and_the_cpu_and_explicit_choices_win(tmp_path):
    with_amx, without_amx = tmp_path / "amx", tmp_path / "no-amx"
    with_amx.write_text(XEON_WITH_AMX)
    without_amx.write_text(XEON_WITHOUT_AMX)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16("auto", cpu, with_amx) and not uses_bf16("auto", cpu, without_amx)
    assert uses_bf16("auto", cuda, without_amx)
    for cpuinfo in (with_amx, without_amx):
        for device in (cpu, cuda):
            assert uses_bf16("bf16", device, cpuinfo) and not uses_bf16("fp32", device, cpuinfo)


def test_the_trainer_takes_its_precision_from_the_config(tiny_config):
    from vitrail.launch.loop import Trainer

    assert tiny_config.run.precision == "fp32" and not Trainer(tiny_config, num_samples=640).autocast
    tiny_config.run.precision = "bf16"
    assert Trainer(tiny_config, num_samples=640).autocast
    tiny_config.run.precision = "auto"
    assert Trainer(tiny_config, num_samples=640).autocast == uses_bf16("auto", torch.device("cpu"))


def test_normalisation_layers_compute_in_float32_under_bf16_autocast():
    from torch import nn

    from vitrail.precision import autocast, float32_norms

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(2), nn.LayerNorm(36), nn.Linear(36, 4))
    seen = {}
    for index in (1, 3):
        model[index].register_forward_hook(lambda layer, inputs, output, index=index: seen.update({index: (inputs[0].dtype, output.dtype)}))
    images = torch.randn(4, 3, 8, 8)
    with autocast(torch.device("cpu"), True):
        model(images)
    # CPU autocast alone leaves both norms in bf16 (CUDA autocast would not).
    assert seen == {1: (torch.bfloat16, torch.bfloat16), 3: (torch.bfloat16, torch.bfloat16)}
    float32_norms(model)
    float32_norms(model)  # idempotent: one hook per layer
    assert len(model[1]._forward_pre_hooks) == len(model[3]._forward_pre_hooks) == 1
    with autocast(torch.device("cpu"), True):
        out = model(images)
    assert seen == {1: (torch.float32, torch.float32), 3: (torch.float32, torch.float32)}
    assert out.dtype == torch.bfloat16  # the matrix products stay in bf16
    assert model[1].running_mean.dtype == torch.float32
