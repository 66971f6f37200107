from vitrail.hardware import cpu_flags, cpu_has_bf16_matrix_units

XEON_WITHOUT_AMX = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_fp16\n\nprocessor\t: 1\nflags\t\t: fpu\n"
XEON_WITH_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"


def test_bf16_autocast_on_the_cpu_needs_amx_not_just_avx512_bf16(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(XEON_WITHOUT_AMX)
    assert "avx512_bf16" in cpu_flags(cpuinfo) and not cpu_has_bf16_matrix_units(cpuinfo)
    cpuinfo.write_text(XEON_WITH_AMX)
    assert cpu_has_bf16_matrix_units(cpuinfo)
    assert cpu_flags(tmp_path / "missing") == set() and not cpu_has_bf16_matrix_units(tmp_path / "missing")


def test_auto_precision_follows_the_cpu(tiny_config):
    from vitrail.launch.loop import Trainer

    assert Trainer(tiny_config, num_samples=640).autocast == cpu_has_bf16_matrix_units()
    tiny_config.run.precision = "bf16"
    assert Trainer(tiny_config, num_samples=640).autocast
