"""One storage layer for every path a user gives: a local path, `file://`, `s3://`, `gs://`, and
read-only `http(s)://` (shards served by any static web server).

Object stores go through pyarrow.fs, the filesystem Ray Data and Ray Train speak too. S3 takes the
standard AWS environment and credentials chain, plus `AWS_ENDPOINT_URL` for S3-compatible stores
(MinIO, Ceph). A URL is never resolved against the working directory; a local path is, since Ray
tasks run elsewhere.

Writes never leave a half file under its final name: a local file is written beside it and
renamed; an object appears only when its upload completes.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from vitrail.errors import VitrailError

OBJECT_SCHEMES = ("s3", "gs")
HTTP_SCHEMES = ("http", "https")
SCHEMES = ("file", *OBJECT_SCHEMES, *HTTP_SCHEMES)
HTTP_TIMEOUT_S = 60


def scheme(url: str | os.PathLike) -> str:
    """The URL's scheme, "" for a plain local path."""
    text = str(url)
    head, separator, _ = text.partition("://")
    return head.lower() if separator and head.isalnum() else ""


def is_local(url: str | os.PathLike) -> bool:
    return scheme(url) in ("", "file")


def local_path(url: str | os.PathLike) -> Path:
    """The local path of a local path or `file://` URL."""
    text = str(url)
    return Path(text[len("file://"):] if scheme(text) == "file" else text)


def check_scheme(url: str | os.PathLike) -> None:
    found = scheme(url)
    if found and found not in SCHEMES:
        raise VitrailError(f"{url}: unsupported URL scheme {found!r}; use a local path, file://, s3://, gs:// or "
                           "http(s):// (read-only)")


def absolute(url: str | os.PathLike) -> str:
    """A local path made absolute (Ray tasks and jobs run in other folders); a URL as it is."""
    check_scheme(url)
    return str(local_path(url).resolve()) if is_local(url) else str(url).rstrip("/")


def join(base: str | os.PathLike, *names: str) -> str:
    if is_local(base):
        return str(local_path(base).joinpath(*names))
    return "/".join([str(base).rstrip("/"), *names])


def name(url: str | os.PathLike) -> str:
    return str(url).rstrip("/").rsplit("/", 1)[-1]


def parent(url: str | os.PathLike) -> str:
    if is_local(url):
        return str(local_path(url).parent)
    return str(url).rstrip("/").rsplit("/", 1)[0]


class _Http:
    """The read-only part of a filesystem over a static web server: whole files, no listing."""

    def open_input_stream(self, url: str):
        try:
            return urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                raise FileNotFoundError(2, "not found (HTTP 404)", url) from None
            raise OSError(f"{url}: HTTP {error.code} {error.reason}") from None

    def get_file_info(self, url: str):

        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
                size = response.headers.get("Content-Length")
                return pafs.FileInfo(url, pafs.FileType.File, size=int(size) if size else None)
        except urllib.error.HTTPError as error:
            if error.code == 404:
                return pafs.FileInfo(url, pafs.FileType.NotFound)
            raise OSError(f"{url}: HTTP {error.code} {error.reason}") from None


@dataclass(frozen=True)
class Location:
    url: str
    filesystem: object  # a pyarrow.fs.FileSystem, or _Http
    path: str           # inside `filesystem`

    @property
    def writable(self) -> bool:
        return not isinstance(self.filesystem, _Http)


_AWS_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def _filesystem(kind: str, bucket: str):
    # One client per setting of the environment: a process that changes its credentials gets new ones.
    settings = tuple(os.environ.get(name) for name in _AWS_SETTINGS) if kind == "s3" else ()
    return _cached_filesystem(kind, bucket, settings)


@lru_cache(maxsize=None)
def _cached_filesystem(kind: str, bucket: str, settings: tuple):

    if kind == "s3":
        environ = dict(zip(_AWS_SETTINGS, settings))
        endpoint = environ["AWS_ENDPOINT_URL_S3"] or environ["AWS_ENDPOINT_URL"]
        region = environ["AWS_REGION"] or environ["AWS_DEFAULT_REGION"]
        if region is None and endpoint is None:
            region = pafs.resolve_s3_region(bucket)
        return pafs.S3FileSystem(endpoint_override=endpoint, region=region or "us-east-1")
    if kind == "gs":
        return pafs.GcsFileSystem()
    return pafs.LocalFileSystem()


def locate(url: str | os.PathLike) -> Location:
    check_scheme(url)
    kind = scheme(url)
    text = str(url)
    if kind in HTTP_SCHEMES:
        return Location(text, _Http(), text)
    if kind in OBJECT_SCHEMES:
        path = text.split("://", 1)[1].rstrip("/")
        try:
            return Location(text, _filesystem(kind, path.split("/", 1)[0]), path)
        except OSError as error:  # no region found for the bucket, no usable credentials
            raise VitrailError(f"cannot reach {url}: {one_line(error)}") from None
    return Location(text, _filesystem("local", ""), str(local_path(text).absolute()))


def _info(url: str | os.PathLike):
    where = locate(url)
    try:
        return where.filesystem.get_file_info(where.path)
    except OSError as error:
        raise VitrailError(f"cannot reach {url}: {one_line(error)}") from None


def one_line(error: BaseException) -> str:
    """The first line of a storage error: the AWS SDK's messages run on with advice and request ids."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def exists(url: str | os.PathLike) -> bool:
    return _info(url).type != pafs.FileType.NotFound


def is_dir(url: str | os.PathLike) -> bool:
    """A folder, or on an object store a prefix holding objects (an empty "folder" does not exist there)."""
    if scheme(url) in HTTP_SCHEMES:
        return False  # a web server has no folders to ask about: its files are asked for by name
    return _info(url).type == pafs.FileType.Directory


def size_and_mtime(url: str | os.PathLike) -> tuple[int, int]:
    info = _info(url)
    return info.size or 0, info.mtime_ns or 0


def listdir(url: str | os.PathLike) -> list[str]:
    """Names of the entries directly in the folder `url`, sorted; [] when it does not exist."""

    where = locate(url)
    if not where.writable:
        raise VitrailError(f"{url}: an http(s) folder cannot be listed; its index.json names the files")
    try:
        found = where.filesystem.get_file_info(pafs.FileSelector(where.path, allow_not_found=True))
    except OSError as error:
        raise VitrailError(f"cannot list {url}: {one_line(error)}") from None
    return sorted(info.base_name for info in found)


def list_files(url: str | os.PathLike) -> list[str]:
    """Every file under the folder `url`, at any depth, as sorted '/'-joined paths relative to it; [] when
    it does not exist."""

    where = locate(url)
    if not where.writable:
        raise VitrailError(f"{url}: an http(s) folder cannot be listed")
    try:
        found = where.filesystem.get_file_info(pafs.FileSelector(where.path, recursive=True, allow_not_found=True))
    except OSError as error:
        raise VitrailError(f"cannot list {url}: {one_line(error)}") from None
    return sorted(info.path[len(where.path.rstrip("/")) + 1:] for info in found if info.type == pafs.FileType.File)


def open_input(url: str | os.PathLike):
    """A binary stream of the file; FileNotFoundError (an OSError) when it is missing."""

    where = locate(url)
    if not where.writable:
        return where.filesystem.open_input_stream(where.path)
    if where.filesystem.get_file_info(where.path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(2, "no such file", str(url))  # pyarrow's own error says less
    # pyarrow would decompress a .gz (and compress one written) by its name: files travel as stored.
    return where.filesystem.open_input_stream(where.path, compression=None)


def read_bytes(url: str | os.PathLike) -> bytes:
    with open_input(url) as stream:
        return stream.read()


def read_text(url: str | os.PathLike) -> str:
    return read_bytes(url).decode()


def _writable(url: str | os.PathLike) -> Location:
    where = locate(url)
    if not where.writable:
        raise VitrailError(f"{url}: http(s) URLs are read-only; write to a local path, s3:// or gs://")
    return where


def makedirs(url: str | os.PathLike) -> None:
    if is_local(url):
        local_path(url).mkdir(parents=True, exist_ok=True)
    else:
        _writable(url)  # an object store has no folders: objects make their prefixes


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    if is_local(url):
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        return
    where = _writable(url)
    try:
        with where.filesystem.open_output_stream(where.path, compression=None) as stream:
            stream.write(data)
    except OSError as error:
        raise VitrailError(f"cannot write {url}: {one_line(error)}") from None


def write_text(url: str | os.PathLike, text: str) -> None:
    write_bytes(url, text.encode())


def append_text(url: str | os.PathLike, text: str) -> None:
    """Append to a small file; an object store rewrites it whole (objects cannot grow)."""
    if is_local(url):
        with open(local_path(url), "a") as handle:
            handle.write(text)
    else:
        write_text(url, (read_text(url) if exists(url) else "") + text)


def put_file(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Move the finished local file `local` to `url` (a rename when `url` is local)."""
    if is_local(url):
        os.replace(local, local_path(url))
        return
    where = _writable(url)
    try:
        with open(local, "rb") as source, where.filesystem.open_output_stream(where.path, compression=None) as stream:
            shutil.copyfileobj(source, stream, 1 << 22)
    except OSError as error:
        raise VitrailError(f"cannot write {url}: {one_line(error)}") from None
    os.unlink(local)


def delete(url: str | os.PathLike) -> None:
    """Delete a file, or a folder with everything in it; nothing when it is absent."""

    where = _writable(url)
    kind = where.filesystem.get_file_info(where.path).type
    if kind == pafs.FileType.Directory:
        where.filesystem.delete_dir(where.path)
    elif kind == pafs.FileType.File:
        where.filesystem.delete_file(where.path)


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a file or folder; on an object store, copy each object, then delete the source."""
    if is_local(source):
        os.replace(local_path(source), local_path(target))
        return

    where, to = _writable(source), _writable(target)
    if where.filesystem.get_file_info(where.path).type == pafs.FileType.File:
        where.filesystem.move(where.path, to.path)
        return
    pafs.copy_files(where.path, to.path, source_filesystem=where.filesystem, destination_filesystem=to.filesystem)
    where.filesystem.delete_dir(where.path)


def upload_tree(local: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copy the local folder `local` into `url`, replacing files of the same names."""

    to = _writable(url)
    pafs.copy_files(str(Path(local).absolute()), to.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=to.filesystem)


def download_tree(url: str | os.PathLike, local: str | os.PathLike) -> None:
    """Copy the folder `url` into the local folder `local` (nothing when it does not exist)."""

    if not is_dir(url):
        return
    where = locate(url)
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(where.path, str(Path(local).absolute()), source_filesystem=where.filesystem,
                    destination_filesystem=pafs.LocalFileSystem())


def check_readable(url: str | os.PathLike, what: str) -> None:
    """Fail now, naming `url`, when it cannot be read: a bad scheme, a missing bucket, refused credentials."""

    if scheme(url) in HTTP_SCHEMES:
        return  # a web server's folders need not answer: the files in them are asked for by name
    if scheme(url) in OBJECT_SCHEMES:
        bucket = str(url).split("://", 1)[1].split("/", 1)[0]
        if _info(f"{scheme(url)}://{bucket}").type == pafs.FileType.NotFound:
            raise VitrailError(f"{what} {url}: bucket {bucket!r} does not exist (or these credentials cannot see it)")
    _info(url)
