"""`benchmarks/gpu.py`, the command a GPU owner runs, works end to end on the CPU: the real DINO
ViT-S/16 step of the paper's recipe, FLOP count, peak memory, and the Ray Data view stream."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_runs_on_the_cpu_and_prints_its_row():
    # The stream starts its own Ray cluster, so the session cluster's loopback settings go with it.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--device", "cpu", "--steps", "1", "--batch-size", "2"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert row["model"] == "dino vit_small/16, 2x224 + 10x96" and row["batch"] == 2 and row["precision"] in ("fp32", "bf16")
    # ViT-S/16 on 2 x 224 + 10 x 96 crops: about 0.1 TFLOP an image for the student's forward and
    # backward and the teacher's forward; the count is torch's own, not ours.
    assert 0.05 * 2 < row["tflop_per_step"] < 0.2 * 2
    assert row["step_s"] > 0 and row["images_per_s"] > 0 and row["peak_memory_mib"] > 0
    assert row["stream_images_per_s"] > 0 and isinstance(row["stream_keeps_up"], bool)
    assert row["mfu"] is None  # no bf16 peak is known for a CPU unless given
    # Found by its prefix: Ray's tasks may print to this stdout too.
    table_rows = [line for line in done.stdout.splitlines() if line.startswith("| cpu (")]
    assert len(table_rows) == 1 and table_rows[0].count("|") == 11, done.stdout[-3000:]
