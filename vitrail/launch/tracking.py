"""Where metrics go: always `metrics.jsonl` in the run dir, plus wandb, TensorBoard or nothing.

wandb runs offline unless WANDB_API_KEY is set (no network call then), keeps its files in
the run dir, and reuses the run id stored there so a resumed run continues the same curve.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

from vitrail.errors import VitrailError


class Tracker:
    def __init__(self, run_dir: str | Path, backend: str, config: dict, name: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")
        self._wandb = self._tensorboard = None
        if backend == "wandb":
            self._wandb = _start_wandb(self.run_dir, config, name or self.run_dir.name)
        elif backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self._metrics.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, step)

    def close(self) -> str | None:
        """Flush and close; returns the `wandb sync` command for an offline run."""
        self._metrics.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            offline = self._wandb.settings.mode == "offline"
            directory = self._wandb.dir
            self._wandb.finish()
            if offline:
                return f"wandb sync {Path(directory).parent}"
        return None


def _start_wandb(run_dir: Path, config: dict, name: str):
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
    id_file.write_text(run_id)
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project="vitrail", name=name, id=run_id, resume="allow", dir=str(run_dir),
                      config=config, mode=mode, settings=wandb.Settings(console="off", silent=True))


def dashboard_command(run_dirs: list[str | Path], port: int = 6006) -> list[str]:
    """TensorBoard over the runs' event files, bound to 127.0.0.1, each run named by its folder."""
    specs = []
    for run_dir in run_dirs:
        events = Path(run_dir) / "tensorboard"
        if not events.is_dir():
            raise VitrailError(f"{run_dir} has no tensorboard/ folder; train it with run.tracking=tensorboard")
        specs.append(f"{Path(run_dir).resolve().name}:{events.resolve()}")
    return [sys.executable, "-m", "tensorboard.main", "--logdir_spec", ",".join(specs),
            "--host", "127.0.0.1", "--port", str(port)]
