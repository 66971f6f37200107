"""FAISS, imported with its bundled OpenBLAS on this CPU's vector kernels: `from vitrail.faiss_blas import faiss`.

faiss-cpu wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu 1.15), older than many CPUs it
now runs on. On a core it does not know (Intel's Emerald Rapids, for one) it falls back to its
'Prescott' SSE3 kernels, and every exact search and k-means step runs at a fifth of the CPU's
float32 peak: 7.4 s instead of 1.8 s for 60k x 384 -> 10k queries (benchmarks/knn.py).
OpenBLAS reads OPENBLAS_CORETYPE once, when the library loads, so the first import of faiss
sets it to the widest kernel family the CPU's flags allow, then puts the environment back.
A value the user set is left alone: it is how a machine works around an OpenBLAS that
mis-computes on it.
"""

from __future__ import annotations

import os
from pathlib import Path

from vitrail.hardware import CPUINFO, cpu_flags

# OpenBLAS kernel families by the instructions their sgemm needs, widest first.
_CORETYPES = (
    ("SkylakeX", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}),
    ("Haswell", {"avx2", "fma"}),
)


def openblas_coretype(cpuinfo: Path = CPUINFO) -> str | None:
    """The OpenBLAS core type for this CPU's flags, or None where no family fits or they can't be read."""
    flags = cpu_flags(cpuinfo)
    return next((coretype for coretype, needed in _CORETYPES if needed <= flags), None)


def _import_faiss():
    coretype = None if "OPENBLAS_CORETYPE" in os.environ else openblas_coretype()
    if coretype is None:
        import faiss
        return faiss
    os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        import faiss
    finally:
        del os.environ["OPENBLAS_CORETYPE"]
    return faiss


faiss = _import_faiss()


def openblas_kernels() -> str | None:
    """The kernel family FAISS's OpenBLAS runs ('SkylakeX', 'Haswell', 'Prescott', ...), as OpenBLAS
    reports it; None for a FAISS built on another BLAS."""
    from threadpoolctl import threadpool_info

    return next((pool.get("architecture") for pool in threadpool_info()
                 if pool["internal_api"] == "openblas" and "faiss" in pool["filepath"]), None)
