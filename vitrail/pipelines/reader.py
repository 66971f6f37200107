"""Stream the samples of one tar shard, surviving truncation and unreadable files.

A shard (a local file or a URL: `vitrail.storage`) is read front to back in tarfile's stream
mode, so a reader never seeks and a shard on slow or remote storage is read once. Members are grouped into samples by key (the member
name up to its first dot). When the file is missing, unreadable or truncated, reading
stops there: the sample being assembled is dropped, and `lost` tells how many of the
samples index.json declares for the shard were never yielded, so the caller can count them.
"""

from __future__ import annotations

import logging
import tarfile
import zlib
from typing import Iterator

from vitrail import storage

log = logging.getLogger("vitrail.data")


class ShardStream:
    """Iterate the samples `{"__key__": key, ext: bytes, ...}` of the shard at `path`."""

    def __init__(self, path: str, declared: int | None):
        """`declared`: the samples index.json declares for the shard; None while indexing it."""
        self.path, self.declared = str(path), declared
        self.read = 0
        self.error: str | None = None

    @property
    def lost(self) -> int:
        """Declared samples never yielded (valid once iteration has ended)."""
        return 0 if self.declared is None else max(0, self.declared - self.read)

    @property
    def extra(self) -> int:
        """Samples yielded beyond the declared count: index.json is stale (valid once iteration has ended)."""
        return 0 if self.declared is None else max(0, self.read - self.declared)

    def __iter__(self) -> Iterator[dict]:
        current: dict | None = None
        try:
            with storage.open_input(self.path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name.rsplit("/", 1)[-1]
                    key, _, ext = name.partition(".")
                    if current is not None and current["__key__"] != key:
                        self.read += 1
                        yield current
                        current = None
                    if current is None:
                        current = {"__key__": key}
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} is truncated")
                    current[ext] = data
        except (OSError, EOFError, tarfile.TarError, zlib.error) as error:
            # A partial sample may lack its image or label: it is dropped with the rest.
            self.error = f"{type(error).__name__}: {error}"
            current = None
        if current is not None:
            self.read += 1
            yield current
        if self.declared is None:
            return  # indexing: the caller reports what it found
        if self.error is not None or self.lost:
            log.warning("shard %s: read %d of %d samples, %d lost (%s)", self.path, self.read, self.declared,
                        self.lost, self.error or "fewer samples than index.json declares")
        if self.extra:
            log.warning("shard %s holds %d samples, index.json declares %d: the %d extra are read and counted in "
                        "data/extra_samples; re-index the folder to fix its counts", self.path, self.read,
                        self.declared, self.extra)
