"""Checkpoints in `RUN_DIR/checkpoints/step-XXXXXXXX/state.pt`, on local disk or object storage.

One folder per checkpoint is the layout Ray Train writes (`ray.train.report(checkpoint=...,
checkpoint_dir_name=...)` under `RunConfig(storage_path=RUN_DIR, name="checkpoints")`), and the
local launcher writes the same. A checkpoint never appears half-written: locally its folder is
written under a temporary name and renamed into place, and an object store shows `state.pt` only
once its upload completes, while a folder without it is no checkpoint; so a process killed
mid-write leaves the previous checkpoint the newest. Loading uses `weights_only=True`, so a
checkpoint cannot run code. A checkpoint damaged all the same (a disk filled up, a copy cut
short) is renamed `*.corrupt` when a run resumes, which goes on from the newest one that loads.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from vitrail import storage
from vitrail.errors import VitrailError

STATE = "state.pt"
_NAME = re.compile(r"^step-(\d{8})$")
_BEFORE_FOLDERS = re.compile(r"^step-(\d{8})\.pt$")  # vitrail's layout before one folder per checkpoint
log = logging.getLogger("vitrail.run")


def checkpoint_dir(run_dir: str | Path) -> str:
    return storage.join(run_dir, "checkpoints")


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[str]:
    """The state files of the run's checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    names = storage.listdir(folder)
    old = [name for name in names if _BEFORE_FOLDERS.match(name)]
    if old:
        # Not read silently as "no checkpoint": the run would start again from step 0.
        moves = "; ".join(f"mkdir {name[:-3]} && mv {name} {name[:-3]}/{STATE}" for name in old)
        raise VitrailError(f"{folder} holds checkpoints in vitrail's earlier layout ({', '.join(old)}); each now "
                           f"lives in its own folder: in {folder}, run {moves}; then resume")
    found = (storage.join(folder, name, STATE) for name in names if _NAME.match(name))
    return [state for state in found if storage.exists(state)]


def step_of(state_file: str) -> int:
    return int(_NAME.match(storage.name(storage.parent(state_file))).group(1))


def latest_step(run_dir: str | Path) -> int:
    """Step recorded by the newest checkpoint, 0 when there is none."""
    found = list_checkpoints(run_dir)
    return step_of(found[-1]) if found else 0


def write_folder(folder: str | Path, state: dict) -> None:
    """`state` as a checkpoint folder at the local path `folder` (what Ray Train uploads)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(state, Path(folder) / STATE)


def save(run_dir: str | Path, step: int, state: dict, keep_last: int) -> str:
    folder = storage.join(checkpoint_dir(run_dir), folder_name(step))
    if storage.is_local(folder):
        parent = storage.local_path(checkpoint_dir(run_dir))
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(".step-*.tmp"):  # left by a process killed mid-write
            shutil.rmtree(stale)
        temporary = parent / f".{folder_name(step)}.tmp"
        write_folder(temporary, state)
        os.replace(temporary, storage.local_path(folder))
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        storage.write_bytes(storage.join(folder, STATE), buffer.getvalue())
    for old in list_checkpoints(run_dir)[:-keep_last]:
        storage.delete(storage.parent(old))
    return storage.join(folder, STATE)


def newest_intact(run_dir: str | Path) -> tuple[str, dict] | None:
    """(file, state) of the newest checkpoint that loads, None when there is none. Newer ones that
    do not load are reported and their folders renamed `*.corrupt` (kept to inspect), so that the
    resume, its data epoch and the next checkpoint's pruning all go on from the intact one. A local
    state is memory-mapped: its tensors are read from disk only when touched."""
    found = list_checkpoints(run_dir)
    corrupt = []
    for path in reversed(found):
        try:
            state = load(path, mmap=True)
        except VitrailError as error:
            corrupt.append((path, error))
            continue
        for damaged, error in corrupt:
            folder = storage.parent(damaged)
            storage.move(folder, f"{folder}.corrupt")
            log.warning("%s; renamed its folder %s.corrupt, resuming from %s", error, storage.name(folder),
                        storage.name(storage.parent(path)))
        return path, state
    if found:
        raise VitrailError(f"no checkpoint in {checkpoint_dir(run_dir)} loads: " + "; ".join(str(error) for _, error in corrupt)
                           + "; start over with --reset (the old run is kept aside) or set another run.dir")
    return None


def load(path: str | Path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint file `path`, a checkpoint folder's, or a run dir's newest checkpoint."""
    path = str(path)
    if storage.is_dir(path):
        if _NAME.match(storage.name(path)):
            path = storage.join(path, STATE)
        else:
            found = list_checkpoints(path)
            if not found:
                raise VitrailError(f"no checkpoint in {checkpoint_dir(path)}")
            path = found[-1]
    try:
        if storage.is_local(path):
            source = storage.local_path(path)
            if not source.exists():
                raise FileNotFoundError
        else:
            source, mmap = io.BytesIO(storage.read_bytes(path)), False
    except FileNotFoundError:
        raise VitrailError(f"checkpoint {path} does not exist") from None
    try:
        return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
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
