"""One file API for local paths and object storage (``s3://bucket/key``), through fsspec.

Every place the data pipeline and the loader take a path also takes a URL. Local paths use the OS
directly (fast, atomic renames); anything with a scheme (``s3://``, ``gs://``, ``memory://``...) goes through
``fsspec`` (s3fs for S3). S3 is configured only by the standard AWS variables: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION`` / ``AWS_REGION``, the shared
credentials/config files, and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for S3-compatible servers
(MinIO, Ceph, moto). Credentials are never logged or written anywhere by this module.

Atomicity: :func:`write_bytes` (and the helpers built on it) replace a local file by a rename of a
temporary file in the same directory; on object storage a PUT is atomic per object. So a reader never
sees half a file, which is what the pipeline's completion records rely on.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


class StorageError(OSError):
    """A missing or unreadable file or object; the message names the URL."""


def is_remote(url: str | Path) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def _local(url: str | Path) -> str:
    s = str(url)
    return s[len("file://"):] if s.startswith("file://") else s


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (never an OS-specific separator inside a URL)."""
    if is_remote(base):
        out = str(base).rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return str(Path(_local(base)).joinpath(*parts))


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(url: str | Path):
    """(fsspec filesystem, path inside it) for a remote URL."""
    import fsspec

    protocol = str(url).split("://", 1)[0]
    kwargs: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        endpoint = _endpoint()
        if endpoint:
            kwargs["endpoint_url"] = endpoint
    fs = fsspec.filesystem(protocol, **kwargs)
    return fs, fs._strip_protocol(str(url))


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return os.path.exists(_local(url))
    fs, path = filesystem(url)
    return fs.exists(path)


def isdir(url: str | Path) -> bool:
    if not is_remote(url):
        return os.path.isdir(_local(url))
    fs, path = filesystem(url)
    return fs.isdir(path)


def size(url: str | Path) -> int:
    try:
        if not is_remote(url):
            return os.path.getsize(_local(url))
        fs, path = filesystem(url)
        return int(fs.size(path))
    except (FileNotFoundError, OSError) as e:
        raise StorageError(f"{url}: not found ({e})") from e


def open_file(url: str | Path, mode: str = "rb"):
    """A file object (binary or text by ``mode``); remote reads stream through fsspec's buffered file."""
    try:
        if not is_remote(url):
            return open(_local(url), mode)
        fs, path = filesystem(url)
        return fs.open(path, mode)
    except FileNotFoundError as e:
        raise StorageError(f"{url}: not found") from e


def read_bytes(url: str | Path) -> bytes:
    try:
        if not is_remote(url):
            return Path(_local(url)).read_bytes()
        fs, path = filesystem(url)
        return fs.cat_file(path)
    except FileNotFoundError as e:
        raise StorageError(f"{url}: not found") from e


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write ``data`` atomically (temporary file + rename locally; one PUT remotely)."""
    if not is_remote(url):
        path = Path(_local(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, path = filesystem(url)
    fs.pipe_file(path, data)


def read_json(url: str | Path) -> Any:
    raw = read_bytes(url)
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise StorageError(f"{url}: corrupt JSON ({e}); delete it and rerun the step that wrote it") from e


def write_json(url: str | Path, obj: Any, indent: int | None = None) -> None:
    write_bytes(url, json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8"))


def save_array(url: str | Path, arr: np.ndarray) -> None:
    """One ``.npy`` file, written atomically."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    write_bytes(url, buf.getvalue())


def load_array(url: str | Path) -> np.ndarray:
    try:
        return np.load(io.BytesIO(read_bytes(url)), allow_pickle=False)
    except ValueError as e:
        raise StorageError(f"{url}: corrupt .npy file ({e}); delete it and rerun the step that wrote it") from e


def makedirs(url: str | Path) -> None:
    """Create a local directory (object stores have no directories: a no-op there)."""
    if not is_remote(url):
        os.makedirs(_local(url), exist_ok=True)


def remove(url: str | Path) -> None:
    """Delete a file or a whole directory / prefix; missing is fine."""
    if not is_remote(url):
        p = _local(url)
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)
        return
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_files(url: str | Path) -> list[str]:
    """Every file under a directory / prefix (recursively), or matching a glob, sorted; as URLs of the
    same kind as ``url``."""
    s = str(url)
    has_glob = any(ch in s for ch in "*?[")
    if not is_remote(s):
        import glob

        p = _local(s)
        if has_glob:
            return sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
        if os.path.isdir(p):
            return sorted(str(f) for f in Path(p).rglob("*") if f.is_file())
        return [p] if os.path.isfile(p) else []
    fs, path = filesystem(s)
    protocol = s.split("://", 1)[0]
    if has_glob:
        found = [f for f in fs.glob(path) if fs.isfile(f)]
    elif fs.isdir(path):
        found = fs.find(path)
    else:
        found = [path] if fs.exists(path) else []
    return sorted(f"{protocol}://{f}" for f in found)


@contextlib.contextmanager
def staged_file(url: str | Path, suffix: str = "") -> Iterator[str]:
    """A local path to write ``url``'s content into; on success it becomes ``url`` atomically (a rename
    locally, one upload remotely); on an exception nothing is published."""
    if not is_remote(url):
        final = Path(_local(url))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}{suffix}"
        try:
            yield str(tmp)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        return
    with tempfile.TemporaryDirectory(prefix="dp-stage-") as d:
        local = os.path.join(d, "file" + suffix)
        yield local
        fs, path = filesystem(url)
        fs.put_file(local, path)


@contextlib.contextmanager
def staged_dir(url: str | Path) -> Iterator[str]:
    """A local directory path (not yet created) to fill; on success it replaces ``url`` (a directory rename
    locally, an upload of every file remotely, after removing what a killed earlier attempt left there)."""
    if not is_remote(url):
        final = Path(_local(url))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            yield str(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="dp-stage-") as parent:
        d = os.path.join(parent, "out")
        yield d
        remove(url)
        fs, path = filesystem(url)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                fs.put_file(str(f), path + "/" + f.relative_to(d).as_posix())


def sweep_partial(url: str | Path) -> int:
    """Delete the ``.<name>.tmp-*`` files and directories that a killed writer left under a local ``url``
    (remote writes are single uploads and leave none). Returns how many were removed."""
    if is_remote(url) or not os.path.isdir(_local(url)):
        return 0
    n = 0
    for dirpath, dirnames, filenames in os.walk(_local(url)):
        for name in list(dirnames) + filenames:
            if name.startswith(".") and ".tmp-" in name:
                remove(os.path.join(dirpath, name))
                n += 1
                if name in dirnames:
                    dirnames.remove(name)
    return n
