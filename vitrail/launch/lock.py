"""One run at a time per run dir: RUN_DIR/.lock, held by `pretrain` for the whole run.

The lock is an flock on RUN_DIR/.lock, and the file names its holder (host, pid, start time) for
the error a second run gets. The kernel drops an flock when its holder dies however it dies, so
a lock left by a killed run is free: the next run takes it over and says whose it was.

Run dirs are local or shared POSIX folders (NFS v4 carries flocks between hosts). An
object-storage run dir (s3://, gs://) is not locked: that would need the store's conditional
writes (create-if-absent) with a lease instead of an flock, which pyarrow.fs does not offer.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from vitrail import storage
from vitrail.errors import VitrailError

LOCK = ".lock"
log = logging.getLogger("vitrail.run")


@contextmanager
def run_dir_lock(run_dir: str | os.PathLike):
    """Hold RUN_DIR/.lock for the block; a VitrailError naming the holder when another process holds it."""
    if not storage.is_local(run_dir):
        log.warning("run dir %s is on object storage, which vitrail cannot lock: run one run at a time in it", run_dir)
        yield
        return
    path = storage.local_path(run_dir) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = _take(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the flock goes: a waiting opener then sees a new file
        os.close(descriptor)


def check_free(run_dir: str | os.PathLike) -> None:
    """Fail now, naming the holder, when a run holds RUN_DIR (for `submit`, whose job takes the lock later)."""
    if not storage.is_local(run_dir):
        return
    path = storage.local_path(run_dir) / LOCK
    if path.exists():
        os.close(_take(path))
        path.unlink(missing_ok=True)


def _take(path: Path) -> int:
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(descriptor)
            os.close(descriptor)
            raise VitrailError(f"run dir {path.parent} is in use by pid {holder.get('pid', '?')} on host "
                               f"{holder.get('host', '?')} (running since {holder.get('since', '?')}; lock {path}): "
                               "wait for that run to end or stop it, or set another run.dir") from None
        if _same_file(descriptor, path):
            break
        os.close(descriptor)  # the holder removed it between our open and flock: lock the new one
    stale = _holder(descriptor)
    if stale:
        log.warning("run dir %s: taking over the lock of pid %s on host %s (since %s), which no longer holds it",
                    path.parent, stale.get("pid"), stale.get("host"), stale.get("since"))
    me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, json.dumps(me).encode(), 0)
    return descriptor


def _holder(descriptor: int) -> dict:
    raw = os.pread(descriptor, 4096, 0)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {"pid": "?", "host": f"? (unreadable lock: {raw[:80]!r})"}


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(descriptor).st_ino
    except FileNotFoundError:
        return False
