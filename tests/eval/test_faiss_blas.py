"""FAISS's bundled OpenBLAS runs its vector kernels, not its SSE3 fallback, on this CPU."""

import json
import os
import subprocess
import sys

from vitrail.faiss_blas import openblas_coretype

PROBE = """
import json, os
from vitrail.faiss_blas import openblas_kernels
print(json.dumps({"architecture": openblas_kernels(), "env": os.environ.get("OPENBLAS_CORETYPE")}))
"""


def probe(**env):
    clean = {name: value for name, value in os.environ.items() if name != "OPENBLAS_CORETYPE"}
    result = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_faiss_openblas_uses_the_cpus_vector_kernels_and_leaves_the_environment_as_it_was():
    coretype = openblas_coretype()
    assert coretype in {"SkylakeX", "Haswell"}, "the reference machine has AVX-512 (CI: at least AVX2)"
    seen = probe()
    assert seen == {"architecture": coretype, "env": None}


def test_a_coretype_the_user_set_is_kept():
    assert probe(OPENBLAS_CORETYPE="Haswell")["architecture"] == "Haswell"


def test_coretype_from_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl\n")
    assert openblas_coretype(cpuinfo) == "SkylakeX"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n")
    assert openblas_coretype(cpuinfo) == "Haswell"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 sse3\n")
    assert openblas_coretype(cpuinfo) is None
    assert openblas_coretype(tmp_path / "missing") is None
