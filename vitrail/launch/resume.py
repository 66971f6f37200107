"""What a run dir that already holds checkpoints allows: resuming the same model and method, or,
with `--reset`, starting over with the old run moved aside.

The model and method sections decide what the checkpoint's tensors are; every other key (steps,
`run.*`, `ray.*`, `eval.*`, data paths) may change between a run and its resume.
"""

from __future__ import annotations

import logging
import time

from vitrail.errors import VitrailError
from vitrail import checkpoints, storage
from vitrail.config import Config, from_dict
from vitrail.launch.lock import LOCK

FIXED_SECTIONS = ("model", "method")
log = logging.getLogger("vitrail.run")


def check_resumable(config: Config) -> None:
    """Refuse, touching nothing, to resume checkpoints of another model or method, naming what differs."""
    found = checkpoints.newest_intact(config.run.dir)
    if found is None:
        return
    path, state = found
    stored = from_dict(state["config"], f"config stored in {path}").model_dump(mode="json")
    current = config.model_dump(mode="json")
    differences = [f"{key} is {stored_value!r} there, {value!r} here"
                   for section in FIXED_SECTIONS
                   for key, stored_value, value in _differences(stored[section], current[section], f"{section}.")]
    if differences:
        raise VitrailError(f"run dir {config.run.dir} holds checkpoints of another model or method ({storage.name(storage.parent(path))}): "
                           f"{'; '.join(differences)}. Resume with the checkpoint's values, pass --reset to start over "
                           "(the old run is moved aside into the run dir), or set another run.dir")


def _differences(stored: dict, current: dict, prefix: str):
    for key in sorted(stored.keys() | current.keys()):
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            yield from _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            yield f"{prefix}{key}", old, new


def set_aside(run_dir: str) -> str | None:
    """Move everything a previous run left in `run_dir` (checkpoints, config, metrics, tracker files,
    results) into `run_dir/reset-<time>/`, so a new run starts from nothing and loses no finished work."""
    entries = [entry for entry in storage.listdir(run_dir) if entry != LOCK and not entry.startswith("reset-")]
    if not entries:
        return None
    aside = storage.join(run_dir, time.strftime("reset-%Y%m%d-%H%M%S"))
    storage.makedirs(aside)
    for entry in entries:
        storage.move(storage.join(run_dir, entry), storage.join(aside, entry))
    log.warning("run dir %s: --reset moved the previous run (%s) into %s", run_dir, ", ".join(sorted(entries)), aside)
    return aside
