"""Where metrics go: always `metrics.jsonl` in the run dir, plus wandb, TensorBoard or nothing.
Images go to `images/<name>_step<N>.png` in the run dir and to the same backend.

wandb runs offline unless WANDB_API_KEY is set (no network call then), keeps its files in
the run dir, and reuses the run id stored there so a resumed run continues the same curve.
Nothing here reads wandb's run files back (their format is wandb's own, with no public reader):
metrics.jsonl holds the same rows.

wandb and TensorBoard write to local files as they go, and an object cannot be appended to: for a
run dir on object storage these files live in a local folder and are copied to the run dir at
each checkpoint (`sync`, just before it) and at the end; a resumed run appends to the run dir's metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from vitrail import storage
from vitrail.errors import VitrailError


class Tracker:
    def __init__(self, run_dir: str | Path, backend: str, config: dict, name: str | None = None):
        self.url = str(run_dir)
        if storage.is_local(run_dir):
            self.run_dir, self._staged = storage.local_path(run_dir), False
            self.run_dir.mkdir(parents=True, exist_ok=True)
        else:
            self.run_dir, self._staged = Path(tempfile.mkdtemp(prefix="vitrail-tracking-")), True
            for kept in ("metrics.jsonl", "wandb_id"):
                if storage.exists(storage.join(self.url, kept)):
                    (self.run_dir / kept).write_bytes(storage.read_bytes(storage.join(self.url, kept)))
        self.backend = backend
        self._metrics = open(self.run_dir / "metrics.jsonl", "a")
        self._wandb = self._tensorboard = None
        if backend == "wandb":
            self._wandb = _start_wandb(self.run_dir, config, name or storage.name(self.url))
        elif backend == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int, images: dict[str, np.ndarray] | None = None) -> None:
        """Scalars (one metrics.jsonl row unless empty) and `images` {name: uint8 (H, W, 3)} at `step`."""
        if metrics:
            self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")
            self._metrics.flush()
            if self._wandb is not None:
                self._wandb.log(metrics, step=step)
            if self._tensorboard is not None:
                for key, value in metrics.items():
                    self._tensorboard.add_scalar(key, value, step)
        for name, image in (images or {}).items():
            self.log_image(name, image, step)

    def log_image(self, name: str, image: np.ndarray, step: int) -> Path:
        """Write `image` (uint8 (H, W, 3), (H, W, 1) or (H, W)) as images/<name>_step<N>.png and log it."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise VitrailError(f"image {name!r} must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        path = self.run_dir / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}_step{step}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(path)
        if self._wandb is not None:
            import wandb
            self._wandb.log({name: wandb.Image(image)}, step=step)
        if self._tensorboard is not None:
            self._tensorboard.add_image(name, image, step, dataformats="HWC")
            self._tensorboard.flush()
        return path

    def sync(self) -> None:
        """Copy the tracker files to a run dir on object storage (nothing to do for a local one)."""
        if not self._staged:
            return
        if self._tensorboard is not None:
            self._tensorboard.flush()
        storage.upload_tree(self.run_dir, self.url)

    def close(self) -> str | None:
        """Flush, close and copy to the run dir; returns the `wandb sync` command for an offline run."""
        self._metrics.close()
        command = None
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            offline = self._wandb.settings.mode == "offline"
            directory = self._wandb.dir
            self._wandb.finish()
            # finish() can return before wandb-core has flushed the run file (wandb 0.31): stopping
            # the service waits for that, so the files are whole once close() returns.
            import wandb
            wandb.teardown()
            if offline:
                run_files = Path(directory).parent
                if self._staged:
                    command = f"wandb sync <a local copy of {storage.join(self.url, str(run_files.relative_to(self.run_dir)))}>"
                else:
                    command = f"wandb sync {run_files}"
        if self._staged:
            storage.upload_tree(self.run_dir, self.url)
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return command


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
        events = storage.join(storage.absolute(run_dir), "tensorboard")
        if not storage.is_dir(events):
            raise VitrailError(f"{run_dir} has no tensorboard/ folder; train it with run.tracking=tensorboard")
        if not storage.is_local(events):  # TensorBoard reads local folders: a copy of the run's events
            copy = Path(tempfile.mkdtemp(prefix="vitrail-dashboard-")) / "tensorboard"
            storage.download_tree(events, copy)
            events = str(copy)
        specs.append(f"{storage.name(storage.absolute(run_dir))}:{Path(events).resolve()}")
    return [sys.executable, "-m", "tensorboard.main", "--logdir_spec", ",".join(specs),
            "--host", "127.0.0.1", "--port", str(port)]
