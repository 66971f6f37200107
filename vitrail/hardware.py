"""What the CPU can do, read from /proc/cpuinfo: the choices that depend on it (FAISS's BLAS
kernels, bf16 autocast) are made from its flags, not from the machine's name."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The first CPU's feature flags (`avx512f`, `amx_bf16`, ...); empty where they can't be read (not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())


def cpu_has_bf16_matrix_units(cpuinfo: Path = CPUINFO) -> bool:
    """AMX tiles: bf16 matrix products several times float32's. AVX512-BF16 alone is not enough:
    on a Xeon with it and no AMX, torch's bf16 matmul ran at half float32's speed (132 against
    320 GFLOP/s) and a ViT-tiny step at 0.5x."""
    return {"amx_bf16", "amx_tile"} <= cpu_flags(cpuinfo)
