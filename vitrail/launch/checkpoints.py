"""Checkpoints in `RUN_DIR/checkpoints/step-XXXXXXXX.pt`, written atomically.

A checkpoint is written to a temporary file in the same folder and renamed into place, so a
process killed mid-write leaves the previous checkpoint intact; loading uses
`weights_only=True`, so a checkpoint cannot run code. A checkpoint damaged all the same (a disk
filled up, a copy cut short) is renamed `*.corrupt` when a run resumes, which goes on from the
newest one that loads.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import torch

from vitrail.errors import VitrailError

_NAME = re.compile(r"^step-(\d{8})\.pt$")
log = logging.getLogger("vitrail.run")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if _NAME.match(path.name))


def latest_step(run_dir: str | Path) -> int:
    """Step recorded by the newest checkpoint, 0 when there is none."""
    found = list_checkpoints(run_dir)
    return int(_NAME.match(found[-1].name).group(1)) if found else 0


def save(run_dir: str | Path, step: int, state: dict, keep_last: int) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step-*.pt.tmp"):  # left by a process killed mid-write
        stale.unlink()
    path = folder / f"step-{step:08d}.pt"
    temporary = folder / f".{path.name}.tmp"
    torch.save(state, temporary)
    os.replace(temporary, path)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        old.unlink()
    return path


def newest_intact(run_dir: str | Path) -> tuple[Path, dict] | None:
    """(file, state) of the newest checkpoint that loads, None when there is none. Newer ones that
    do not load are reported and renamed `*.corrupt` (kept to inspect), so that the resume, its data
    epoch and the next checkpoint's pruning all go on from the intact one. The state is memory-mapped:
    its tensors are read from disk only when touched."""
    found = list_checkpoints(run_dir)
    corrupt = []
    for path in reversed(found):
        try:
            state = load(path, mmap=True)
        except VitrailError as error:
            corrupt.append((path, error))
            continue
        for damaged, error in corrupt:
            os.replace(damaged, damaged.with_name(f"{damaged.name}.corrupt"))
            log.warning("%s; renamed it %s.corrupt, resuming from %s", error, damaged.name, path.name)
        return path, state
    if found:
        raise VitrailError(f"no checkpoint in {checkpoint_dir(run_dir)} loads: " + "; ".join(str(error) for _, error in corrupt)
                           + "; start over with --reset (the old run is kept aside) or set another run.dir")
    return None


def load(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise VitrailError(f"no checkpoint in {checkpoint_dir(path)}")
        path = found[-1]
    if not path.exists():
        raise VitrailError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises several types for unreadable or unsafe files
        raise VitrailError(f"cannot load checkpoint {path}: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    """One line for what torch raised: its messages span paragraphs of advice."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    code = next((line for line in lines if "GLOBAL " in line), None)
    if isinstance(error, pickle.UnpicklingError) and code:
        called = code.split("GLOBAL ", 1)[1].split()[0]
        return f"loading it would call {called} (a pickle holding code, not only tensors), which vitrail refuses"
    # A file that is no pickle at all reads as an unsupported opcode, named deep in the advice.
    detail = next((line for line in lines if line.startswith("Unsupported operand")), lines[0].split(". ")[0] if lines else "")
    return f"not a complete torch checkpoint (truncated, corrupt or another format): {type(error).__name__} {detail}"
