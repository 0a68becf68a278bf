"""URI -> pyarrow filesystem + path, for Ray Data, Ray Train and rayrec's own reads and writes.

Local paths, `file://` URIs and `s3://bucket/prefix` are accepted. S3 endpoint, region and
credentials come from the standard AWS environment (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`,
`AWS_REGION` / `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` or an instance
role), never from configs, so the same command runs against AWS S3, MinIO or moto.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


class StorageError(OSError):
    """A URI that cannot be read or written; the message names the URI and the likely fix."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it (no scheme), and the original URI."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")

    def join(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts)
        return Location(self.fs, path, uri)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the standard AWS environment variables."""
    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    elif endpoint:
        kwargs["region"] = "us-east-1"
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike[str]) -> Location:
    """Turn a plain path, `file://...` or `s3://bucket/prefix` into a `Location`."""
    text = os.fspath(uri)
    if text.startswith("s3://"):
        path = text[len("s3://") :].rstrip("/")
        if not path or path.startswith("/"):
            raise StorageError(f"{text!r} has no bucket; write s3://BUCKET/PREFIX")
        return Location(s3_filesystem(), path, "s3://" + path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise StorageError(f"{text!r}: unsupported scheme {scheme!r}; use a local path, file:// or s3://")
    path = str(Path(text).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


def _describe(loc: Location, exc: Exception) -> StorageError:
    hint = ""
    if loc.is_s3:
        hint = (
            " (check that the bucket exists and that AWS credentials, AWS_REGION and, for a"
            f" non-AWS store, AWS_ENDPOINT_URL_S3 are set; endpoint now: {s3_endpoint() or 'AWS default'})"
        )
    return StorageError(f"{loc.uri}: {exc}{hint}")


def file_info(loc: Location) -> pafs.FileInfo:
    try:
        return loc.fs.get_file_info(loc.path)
    except OSError as exc:
        raise _describe(loc, exc) from exc


def exists(loc: Location) -> bool:
    return file_info(loc).type != pafs.FileType.NotFound


def is_dir(loc: Location) -> bool:
    return file_info(loc).type == pafs.FileType.Directory


def is_file(loc: Location) -> bool:
    return file_info(loc).type == pafs.FileType.File


def makedirs(loc: Location) -> None:
    try:
        loc.fs.create_dir(loc.path, recursive=True)
    except OSError as exc:
        raise _describe(loc, exc) from exc


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{loc.uri} does not exist") from exc
    except OSError as exc:
        raise _describe(loc, exc) from exc


def write_bytes(loc: Location, data: bytes) -> None:
    """Write a whole object (S3 uploads appear atomically; local files go through a temp name)."""
    try:
        parent = posixpath.dirname(loc.path)
        if parent and not loc.is_s3:
            loc.fs.create_dir(parent, recursive=True)
        tmp = loc.path if loc.is_s3 else loc.path + ".tmp"
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
        if tmp != loc.path:
            loc.fs.move(tmp, loc.path)
    except OSError as exc:
        raise _describe(loc, exc) from exc


def read_text(loc: Location) -> str:
    return read_bytes(loc).decode("utf-8")


def write_text(loc: Location, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def read_json(loc: Location) -> Any:
    return json.loads(read_text(loc))


def write_json(loc: Location, obj: Any) -> None:
    write_text(loc, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _entries(loc: Location, recursive: bool) -> list[pafs.FileInfo]:
    try:
        return loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=recursive))
    except FileNotFoundError as exc:
        raise StorageError(f"{loc.uri} does not exist") from exc
    except OSError as exc:
        raise _describe(loc, exc) from exc


def list_files(loc: Location, recursive: bool = True) -> list[str]:
    """Paths (inside the filesystem) of the files under a directory, sorted."""
    return sorted(i.path for i in _entries(loc, recursive) if i.type == pafs.FileType.File)


def list_dirs(loc: Location) -> list[str]:
    """Names of the directories directly under a directory, sorted."""
    return sorted(
        posixpath.basename(i.path) for i in _entries(loc, False) if i.type == pafs.FileType.Directory
    )


def delete_dir(loc: Location) -> None:
    if exists(loc):
        try:
            loc.fs.delete_dir(loc.path)
        except OSError as exc:
            raise _describe(loc, exc) from exc


def copy_dir(src: Location, dst: Location) -> None:
    """Copy a directory tree between any two filesystems (local <-> S3)."""
    try:
        pafs.copy_files(src.path, dst.path, source_filesystem=src.fs, destination_filesystem=dst.fs)
    except OSError as exc:
        raise _describe(src, exc) from exc


def local_copy(loc: Location, cache_dir: str | os.PathLike[str]) -> Path:
    """A local directory with the contents of `loc`: `loc` itself when local, else a download."""
    if not loc.is_s3:
        return Path(loc.path)
    target = Path(cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    copy_dir(loc, resolve(str(target)))
    return target


def local_folder(uri: str, cache_dir: str | os.PathLike[str], what: str) -> str:
    """A local folder with the checkpoint at `uri` (downloaded when in S3); `what` names it in errors."""
    loc = resolve(uri)
    if loc.is_s3:
        return str(local_copy(loc, cache_dir))
    if not Path(loc.path).is_dir():
        raise StorageError(f"{what} {uri!r} is not a folder; give a local folder or an s3:// URI")
    return loc.path
