"""One file API for local paths and object storage (``s3://bucket/key``), through fsspec.

Every place the data pipeline and the loader take a path also takes a URL. Local paths use the OS
directly (fast, atomic renames); anything with a scheme (``s3://``, ``gs://``, ``memory://``...) goes through
``fsspec`` (s3fs for S3). S3 is configured only by the standard AWS variables: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, ``AWS_DEFAULT_REGION`` / ``AWS_REGION``, the
shared credentials/config files, ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for S3-compatible servers
(MinIO, Ceph, moto), and botocore's ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE``. Credentials are never logged or
written anywhere by this module, and error messages carry URLs with any ``user:password@`` part removed.

Failures. Every remote operation is retried on transient errors (connection resets, timeouts, truncated
bodies, HTTP 500/502/503/504, ``SlowDown`` throttling): botocore retries each request (standard mode, 5
attempts unless ``AWS_MAX_ATTEMPTS`` says otherwise), s3fs retries truncated reads, and this module retries the
whole operation ``OP_ATTEMPTS`` times with exponential backoff ``OP_BACKOFF_S * 2**k`` (plus jitter). What is
left is raised as a :class:`StorageError` that names the URL and the fix: :class:`ObjectNotFound` (also a
``FileNotFoundError``), :class:`AccessDenied` (also a ``PermissionError``), :class:`EndpointUnreachable`, or a
corrupt file (:func:`read_json`, :func:`load_array`).

Atomicity: :func:`write_bytes` (and the helpers built on it, and :func:`download_file`) replace a local file by
a rename of a temporary file in the same directory; on object storage a PUT (or a completed multipart
upload) is atomic per object. So a reader never sees half a file, which is what the pipeline's completion
records and the loader's shard cache rely on.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

log = logging.getLogger(__name__)

T = TypeVar("T")

OP_ATTEMPTS = 3  # whole-operation attempts on a transient error (each request also retried by botocore)
OP_BACKOFF_S = 0.5  # first backoff; doubled per attempt
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


class StorageError(OSError):
    """A missing or unreadable file or object; the message names the URL and the fix."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The file or object does not exist."""


class AccessDenied(StorageError, PermissionError):
    """The credentials in use may not read or write the object."""


class EndpointUnreachable(StorageError, ConnectionError):
    """The object store did not answer (after the retries)."""


# ----------------------------------------------------------------------------------------------------
# URLs
# ----------------------------------------------------------------------------------------------------


def is_remote(url: str | Path) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def _local(url: str | Path) -> str:
    s = str(url)
    return s[len("file://") :] if s.startswith("file://") else s


def redact(url: str | Path) -> str:
    """``url`` without a ``user:password@`` part (what error messages and logs print)."""
    return re.sub(r"(?<=://)[^/@\s]+@", "", str(url))


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (never an OS-specific separator inside a URL)."""
    if is_remote(base):
        out = str(base).rstrip("/")
        for p in parts:
            out += "/" + str(p).strip("/")
        return out
    return str(Path(_local(base)).joinpath(*parts))


def dirname(url: str | Path) -> str:
    """The directory / prefix holding ``url`` (a URL stays a URL)."""
    if is_remote(url):
        s = str(url).rstrip("/")
        head, _, _ = s.rpartition("/")
        return head if "://" in head else s
    return str(Path(_local(url)).parent)


def basename(url: str | Path) -> str:
    return str(url).rstrip("/").rpartition("/")[2] if is_remote(url) else Path(_local(url)).name


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(url: str | Path):
    """(fsspec filesystem, path inside it) for a remote URL.

    S3: s3fs with the endpoint from ``AWS_ENDPOINT_URL[_S3]``, no listing cache (other processes write the
    same prefixes), bounded connect/read timeouts, and botocore's standard retry mode unless
    ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` choose otherwise. Instances are cached by fsspec per process."""
    import fsspec

    protocol = str(url).split("://", 1)[0]
    kwargs: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        protocol = "s3"
        endpoint = _endpoint()
        if endpoint:
            kwargs["endpoint_url"] = endpoint
        config: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S}
        if not (os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE")):
            config["retries"] = {"mode": "standard", "max_attempts": 5}
        kwargs["config_kwargs"] = config
        kwargs["use_listings_cache"] = False
    try:
        fs = fsspec.filesystem(protocol, **kwargs)
    except (ImportError, ValueError) as e:
        raise StorageError(
            f"{redact(url)}: no filesystem for '{protocol}://' ({e}); for s3:// install the pinned s3fs (make setup)"
        ) from e
    return fs, fs._strip_protocol(str(url))


# ----------------------------------------------------------------------------------------------------
# errors and retries
# ----------------------------------------------------------------------------------------------------

_TRANSIENT_NAMES = (
    "Timeout",
    "ConnectionClosed",
    "ConnectionReset",
    "ServerDisconnected",
    "ClientPayload",
    "IncompleteRead",
    "ResponseStreaming",
    "ProtocolError",
    "ReadTimeout",
    "ClientOSError",
)
_TRANSIENT_CODES = (
    "SlowDown",
    "Throttl",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "503",
    "500",
    "502",
    "504",
    "Service Unavailable",
    "Bad Gateway",
    "Gateway Timeout",
)


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return out


def _unreachable(exc: BaseException) -> bool:
    return any(
        type(e).__name__ in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError")
        for e in _chain(exc)
    )


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the operation may succeed (network trouble, throttling, server errors)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    for e in _chain(exc):
        if isinstance(e, (TimeoutError, ConnectionError)) or any(n in type(e).__name__ for n in _TRANSIENT_NAMES):
            return True
        text = str(e)
        if any(c in text for c in _TRANSIENT_CODES):
            return True
    return False


def translate(exc: BaseException, url: str | Path, op: str) -> StorageError:
    """A :class:`StorageError` naming ``url`` and the fix for ``exc`` (already one: returned as is)."""
    if isinstance(exc, StorageError):
        return exc
    where = redact(url)
    detail = redact(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, FileNotFoundError):
        hint = (
            "check the URL and that the object was uploaded (aws s3 ls); for a dataset, rerun the step that writes it"
            if is_remote(url)
            else "check the path; for a dataset, rerun the step that writes it"
        )
        return ObjectNotFound(f"{where}: not found ({op}); {hint}")
    if isinstance(exc, PermissionError) or "AccessDenied" in str(exc) or "Forbidden" in str(exc):
        hint = (
            "the credentials in use (AWS_ACCESS_KEY_ID / AWS_PROFILE / instance role) lack permission for this "
            "bucket or key; grant s3:GetObject/PutObject/ListBucket or use other credentials"
            if is_remote(url)
            else "fix the file permissions"
        )
        return AccessDenied(f"{where}: access denied ({op}); {hint}")
    if _unreachable(exc):
        return EndpointUnreachable(
            f"{where}: object store unreachable ({op}: {detail}); check AWS_ENDPOINT_URL "
            f"(now {redact(_endpoint() or 'unset: AWS itself')}) and the network"
        )
    return StorageError(f"{where}: {op} failed ({detail})")


def retrying(op: str, url: str | Path, fn: Callable[[], T], attempts: int | None = None) -> T:
    """``fn()``, retried on transient errors; any failure is raised as a :class:`StorageError` naming ``url``.

    Backoff before retry k (k = 1, 2, ...): ``OP_BACKOFF_S * 2**(k-1) * U(1, 1.5)`` seconds."""
    attempts = attempts or OP_ATTEMPTS
    for k in range(1, attempts + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            if k < attempts and is_transient(e) and not _unreachable(e):
                wait = OP_BACKOFF_S * 2 ** (k - 1) * (1 + 0.5 * random.random())
                log.warning(
                    "%s %s: transient error (%s), retry %d/%d in %.1f s",
                    op,
                    redact(url),
                    type(e).__name__,
                    k,
                    attempts - 1,
                    wait,
                )
                time.sleep(wait)
                continue
            raise translate(e, url, op) from e
    raise AssertionError("unreachable")


def _remote(op: str, url: str | Path, call: Callable[[Any, str], T]) -> T:
    fs, path = filesystem(url)
    return retrying(op, url, lambda: call(fs, path))


# ----------------------------------------------------------------------------------------------------
# the API
# ----------------------------------------------------------------------------------------------------


def exists(url: str | Path) -> bool:
    if not is_remote(url):
        return os.path.exists(_local(url))
    return _remote("exists", url, lambda fs, p: bool(fs.exists(p)))


def isdir(url: str | Path) -> bool:
    if not is_remote(url):
        return os.path.isdir(_local(url))
    return _remote("isdir", url, lambda fs, p: bool(fs.isdir(p)))


def size(url: str | Path) -> int:
    if not is_remote(url):
        try:
            return os.path.getsize(_local(url))
        except OSError as e:
            raise translate(e, url, "size") from e
    return _remote("size", url, lambda fs, p: int(fs.size(p)))


def open_file(url: str | Path, mode: str = "rb"):
    """A file object (binary or text by ``mode``); remote reads stream through fsspec's buffered file (opening
    is retried; a read error later is raised by the file object itself)."""
    if not is_remote(url):
        try:
            if "w" in mode or "a" in mode:
                Path(_local(url)).parent.mkdir(parents=True, exist_ok=True)
            return open(_local(url), mode)
        except OSError as e:
            raise translate(e, url, "open") from e
    return _remote("open", url, lambda fs, p: fs.open(p, mode))


def read_bytes(url: str | Path) -> bytes:
    if not is_remote(url):
        try:
            return Path(_local(url)).read_bytes()
        except OSError as e:
            raise translate(e, url, "read") from e
    return _remote("read", url, lambda fs, p: fs.cat_file(p))


def write_bytes(url: str | Path, data: bytes) -> None:
    """Write ``data`` atomically (temporary file + rename locally; one PUT remotely)."""
    if not is_remote(url):
        path = Path(_local(url))
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise translate(e, url, "write") from e
        return
    _remote("write", url, lambda fs, p: fs.pipe_file(p, data))


def read_json(url: str | Path) -> Any:
    raw = read_bytes(url)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StorageError(f"{redact(url)}: corrupt JSON ({e}); delete it and rerun the step that wrote it") from e


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
    except (ValueError, EOFError) as e:
        raise StorageError(f"{redact(url)}: corrupt .npy file ({e}); delete it and rerun the step that wrote it") from e


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

    def rm(fs, path):
        if fs.exists(path):
            fs.rm(path, recursive=True)

    _remote("remove", url, rm)


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
    protocol = s.split("://", 1)[0]

    def find(fs, path):
        if has_glob:
            return [f for f, info in fs.glob(path, detail=True).items() if info.get("type") == "file"]
        if fs.isdir(path):
            return fs.find(path)
        return [path] if fs.exists(path) else []

    return sorted(f"{protocol}://{f}" for f in _remote("list", s, find))


# ----------------------------------------------------------------------------------------------------
# transfers
# ----------------------------------------------------------------------------------------------------


def download_file(url: str | Path, local_path: str | Path) -> int:
    """Copy one file or object to ``local_path`` atomically (temporary file in the same directory + rename);
    returns its size in bytes. A partial download never becomes visible under ``local_path``."""
    dest = Path(local_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if is_remote(url):
            _remote("download", url, lambda fs, p: fs.get_file(p, str(tmp)))
        else:
            try:
                shutil.copyfile(_local(url), tmp)
            except OSError as e:
                raise translate(e, url, "copy") from e
        os.replace(tmp, dest)
        return dest.stat().st_size
    finally:
        tmp.unlink(missing_ok=True)


def upload_file(local_path: str | Path, url: str | Path) -> None:
    """Copy a local file to ``url`` (multipart for large files; atomic per object), or to a local path."""
    if not is_remote(url):
        download_file(local_path, url)
        return
    if not os.path.isfile(local_path):
        raise ObjectNotFound(f"{local_path}: not found (upload to {redact(url)})")
    _remote("upload", url, lambda fs, p: fs.put_file(str(local_path), p))


def copy_tree(src: str | Path, dst: str | Path) -> int:
    """Copy every file under ``src`` (a directory or prefix) to the same relative path under ``dst``; local and
    remote in any combination. Returns the number of files. Each file is written atomically."""
    files = list_files(src)
    root = str(src).rstrip("/")
    for f in files:
        rel = f[len(root) :].lstrip("/") if is_remote(src) else os.path.relpath(f, _local(src))
        target = join(dst, *rel.split("/")) if is_remote(dst) else join(dst, rel)
        if is_remote(f) and is_remote(target):
            write_bytes(target, read_bytes(f))
        elif is_remote(f):
            download_file(f, target)
        else:
            upload_file(f, target)
    return len(files)


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
        upload_file(local, url)


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
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                upload_file(f, join(url, *f.relative_to(d).parts))


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
