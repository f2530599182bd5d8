"""Where a run's files live: a local folder (default ``./runs``) or ``s3://bucket/prefix``.

``open_storage`` turns a ``StorageConfig`` into one pyarrow filesystem plus a root inside it, and
checks at open time that the place is usable, so a wrong bucket or endpoint fails before any Ray
worker starts. The same filesystem object is handed to Ray (``ray_storage_args``), which pickles
it to its workers: endpoint and credentials travel with it instead of depending on environment
variables that must be set before ``ray.init()``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from gan_core.config import StorageConfig

# Callers that use storage anyway import redact from here (services.train, tuning, ...).
from services.secrets import redact

log = logging.getLogger("raygan")
T = TypeVar("T")

ALLOWED_FORMS = "a local folder path (e.g. ./runs or /data/runs) or s3://bucket[/prefix]"

# Short enough that a dead endpoint fails the open in seconds, long enough for a busy server.
# request_timeout bounds one socket read, not a whole transfer, so big uploads are unaffected.
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 30.0
# raygan's own S3 operations (samples, local-backend checkpoints, reads) retry an outage for
# about 15 s: 0.5, 1, 2, 4, 8 s between 6 attempts. Ray's checkpoint uploads go through the
# same filesystem, whose SDK retries each request S3_SDK_ATTEMPTS times; an upload that still
# fails fails the worker, and Ray restarts it from the last registered checkpoint.
S3_ATTEMPTS = 6
S3_FIRST_BACKOFF_S = 0.5
S3_SDK_ATTEMPTS = 5

# Legacy us-east-1 buckets may hold capitals and underscores, so this is looser than today's
# naming rules; it only has to catch typos such as an empty name or a stray ':'.
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")


class StorageError(RuntimeError):
    """Storage that cannot be used: malformed URI, missing bucket, unreachable endpoint, ...

    The message is redacted here, once, because it may quote a URI, an endpoint or a client
    library's error text, any of which can carry a credential.
    """

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


class StorageFullError(StorageError):
    """A write the file system refused for lack of space or quota, or on a read-only mount.

    Repeating it cannot succeed until someone frees space or changes the target, so it is never
    retried; ``services.train`` exits 2 with its message (a setup to fix, like a bad URI)."""


# What the errno of a write that cannot succeed when repeated means, in the message.
_UNWRITABLE = {
    errno.ENOSPC: "no space left",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
STORAGE_HINT = "free space or point storage.uri elsewhere"
RESUME_NOTE = "the run resumes from its last complete checkpoint"


def write_failure(
    exc: BaseException, where: str, file: str, hint: str = STORAGE_HINT
) -> StorageFullError | None:
    """``exc`` as a StorageFullError (``<where>: no space left writing <file>: <hint>; ...``)
    when it is a write refused for space, quota or a read-only mount; None otherwise."""
    reason = _UNWRITABLE.get(getattr(exc, "errno", None) or 0)
    if reason is None:
        return None
    return StorageFullError(f"{where}: {reason} writing {file}: {hint}; {RESUME_NOTE}")


def write_atomic(
    path: Path,
    data: bytes,
    where: str,
    file: str,
    hint: str = STORAGE_HINT,
    *,
    make_parent: bool = False,
    sync: Callable[[int], None] | None = None,
) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: a
    reader (or a resume after a crash) sees the old file or the new one, never half of one.
    ``sync`` (``os.fsync``) gets the temporary file's descriptor before the rename, for a
    caller whose later writes must not outrun this one; ``make_parent`` creates the folder.
    A write refused for space, quota or a read-only mount is a StorageFullError naming
    ``file`` in ``where`` (``write_failure``); the temporary file never outlives a failure."""
    tmp = ""
    try:
        if make_parent:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if sync is not None:
                out.flush()
                sync(out.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        full = write_failure(exc, where, file, hint)
        if full is not None:
            raise full from exc
        raise


# pyarrow (Ray's checkpoint uploads) reports OS errors as text: "... [errno 28] No space ...".
_ERRNO_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)


def find_write_failure(exc: BaseException, where: str) -> StorageFullError | None:
    """The StorageFullError behind ``exc``, wherever it hides: in its cause or context chain,
    inside Ray's wrappers (a RayTaskError's ``cause``, a TrainingFailedError's
    ``worker_failures``), or as an OSError with one of those errnos (named as a write to
    ``where``, e.g. ``storage /data/runs``). None when ``exc`` is another failure."""
    found: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo:
        error = todo.pop(0)
        if any(error is seen for seen in found):
            continue
        found.append(error)
        failures = getattr(error, "worker_failures", None)
        nested = list(failures.values()) if isinstance(failures, dict) else []
        nested += [getattr(error, "cause", None), error.__cause__, error.__context__]
        nested.append(getattr(error, "controller_failure", None))
        todo.extend(e for e in nested if isinstance(e, BaseException))
    # Ours first (it names the file), then a bare OSError, then pyarrow's text.
    for error in found:
        if isinstance(error, StorageFullError) and not isinstance(
            getattr(error, "cause", None), BaseException
        ):
            return error
    for error in found:
        if isinstance(error, OSError) and not isinstance(error, StorageError):
            full = write_failure(error, where, str(error.filename or "a file"))
            if full is not None:
                return full
    for error in found:
        match = _ERRNO_TEXT.search(str(error))
        if match and int(match.group(1)) in _UNWRITABLE:
            reason = _UNWRITABLE[int(match.group(1))]
            return StorageFullError(
                f"{where}: {reason} writing a file: {STORAGE_HINT}; {RESUME_NOTE}"
            )
    return None


@dataclass
class Storage:
    """A root folder in a pyarrow filesystem; every ``relpath`` is relative to that root."""

    uri: str  # absolute local path, or s3://bucket/prefix without a trailing slash
    filesystem: pafs.FileSystem
    root: str  # the root as a path inside ``filesystem``: absolute path, or "bucket/prefix"
    is_s3: bool

    def run_uri(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def _relative(self, relpath: str, file: bool = False) -> str:
        parts = PurePosixPath(relpath.replace("\\", "/")).parts
        if relpath.startswith(("/", "\\")) or ".." in parts or (file and not parts):
            raise StorageError(f"{relpath!r} is not a relative path inside {self.uri}")
        return "/".join(parts)

    def _path(self, relpath: str) -> str:
        rel = self._relative(relpath)
        return f"{self.root}/{rel}" if rel else self.root

    def _retry(self, what: str, relpath: str, call: Callable[[], T]) -> T:
        """``call()``, retried with doubling backoff on S3 I/O errors; a clear StorageError
        naming the URI when the attempts run out. Local errors are not retried (a full disk
        does not heal in seconds)."""
        if not self.is_s3:
            return call()
        delay, waited = S3_FIRST_BACKOFF_S, 0.0
        for attempt in range(1, S3_ATTEMPTS + 1):
            try:
                return call()
            except FileNotFoundError:
                raise
            except OSError as exc:
                if attempt == S3_ATTEMPTS:
                    raise StorageError(
                        f"storage {self.uri}: {what} {relpath!r} failed after {attempt} "
                        f"attempts over {waited:.1f} s of backoff: {exc}"
                    ) from None
                log.warning(
                    "storage %s: %s %r failed (%s); retry %d of %d in %.1f s",
                    self.uri,
                    what,
                    relpath,
                    redact(str(exc)),
                    attempt,
                    S3_ATTEMPTS - 1,
                    delay,
                )
                time.sleep(delay)
                waited += delay
                delay *= 2
        raise AssertionError("unreachable")

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write one file and return its full URI; a local file is replaced atomically."""
        rel = self._relative(relpath, file=True)
        path = f"{self.root}/{rel}"
        if self.is_s3:
            # An S3 PUT is atomic already: readers see the old object or the new one, so a
            # failed attempt leaves the old object in place and a retry starts from scratch.
            def put() -> None:
                with self.filesystem.open_output_stream(path) as out:
                    out.write(data)

            self._retry("write", rel, put)
        else:
            # A full disk is not retried (it does not heal in seconds) and is said plainly.
            write_atomic(Path(path), data, f"storage {self.uri}", rel, make_parent=True)
        return f"{self.uri}/{rel}"

    def read_bytes(self, relpath: str) -> bytes:
        # open_input_file does ranged reads; open_input_stream is very slow against some servers.
        def read() -> bytes:
            with self.filesystem.open_input_file(self._path(relpath)) as src:
                return src.read()

        return self._retry("read", relpath, read)

    def exists(self, relpath: str) -> bool:
        """True for a file or a folder (on S3: a prefix holding at least one object)."""
        info = self._retry(
            "stat", relpath, lambda: self.filesystem.get_file_info(self._path(relpath))
        )
        return info.type != pafs.FileType.NotFound

    def list(self, relpath: str = "") -> list[str]:
        """Files below ``relpath``, recursively, as sorted paths relative to ``relpath``."""
        base = self._path(relpath)
        selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = self._retry("list", relpath, lambda: self.filesystem.get_file_info(selector))
        return sorted(
            info.path[len(base) + 1 :] for info in infos if info.type == pafs.FileType.File
        )


def _parse_s3(uri: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of an ``s3://`` URI, prefix without leading/trailing slashes."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(
            f"storage URI {uri!r} has no valid bucket name (3-63 letters, digits, '.', '-'); "
            f"allowed: {ALLOWED_FORMS}"
        )
    prefix = "/".join(part for part in prefix.split("/") if part)
    if ".." in prefix.split("/"):
        raise StorageError(f"storage URI {uri!r} contains '..'; allowed: {ALLOWED_FORMS}")
    return bucket, prefix


def _endpoint(cfg: StorageConfig) -> tuple[str, str] | None:
    """``(host[:port], scheme)`` of the configured or environment endpoint; None for AWS."""
    endpoint = (
        cfg.endpoint
        or os.environ.get("AWS_ENDPOINT_URL_S3", "")
        or os.environ.get("AWS_ENDPOINT_URL", "")
    ).strip()
    if not endpoint:
        return None
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
        raise StorageError(f"S3 endpoint {endpoint!r} is malformed; allowed: http(s)://host[:port]")
    return parts.netloc, parts.scheme


def _s3_options(cfg: StorageConfig) -> dict:
    """pyarrow S3FileSystem options: region, timeouts, the endpoint and explicit credentials."""
    endpoint = _endpoint(cfg)
    options: dict = {
        "region": cfg.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        "connect_timeout": CONNECT_TIMEOUT_S,
        "request_timeout": REQUEST_TIMEOUT_S,
    }
    if endpoint is not None:
        options["endpoint_override"], options["scheme"] = endpoint
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        # Explicit keys are pickled with the filesystem, so Ray's workers and controller use them
        # wherever they run; without them each process walks AWS's default credential chain.
        options.update(
            access_key=key,
            secret_key=secret,
            session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        )
    return options


def s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    """An S3 filesystem on the storage's endpoint and credentials, retrying each request: what
    a run reads its ``s3://`` training data with (one endpoint per job, the storage's)."""
    return pafs.S3FileSystem(
        **_s3_options(cfg),
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_SDK_ATTEMPTS),
    )


def _open_s3(cfg: StorageConfig, uri: str) -> Storage:
    bucket, prefix = _parse_s3(uri)
    uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    endpoint = _endpoint(cfg)
    options = _s3_options(cfg)
    where = f"{uri} (endpoint {endpoint[1]}://{endpoint[0]})" if endpoint else uri
    try:
        # The open-time probe tries once: a wrong endpoint must fail in seconds, before any
        # worker starts. The filesystem the run uses retries each request (an outage mid-run).
        probe = pafs.S3FileSystem(
            **options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1)
        )
        kind = probe.get_file_info(bucket).type
        filesystem = pafs.S3FileSystem(
            **options,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_SDK_ATTEMPTS),
            # Uploads in the writing thread. Ray and Tune copy folders with pyarrow's
            # copy_files, which closes each file on one of pyarrow's I/O threads; through
            # RetryingS3Handler that close writes to S3, and a background write would wait for
            # another I/O thread: once all of them wait, the copy hangs for ever (Ray avoids it
            # only for a bare S3FileSystem, apache/arrow#32372). Our writes are buffered whole,
            # so background writes bought nothing.
            background_writes=False,
        )
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot reach storage {where}: {exc}") from None
    if kind == pafs.FileType.NotFound:
        raise StorageError(f"storage {where}: bucket {bucket!r} does not exist; create it first")
    root = f"{bucket}/{prefix}" if prefix else bucket
    return Storage(uri=uri, filesystem=filesystem, root=root, is_s3=True)


def _open_local(uri: str) -> Storage:
    path = Path(uri).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        # os.access says yes to root even on a read-only mount; writing a probe does not lie.
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StorageError(f"storage folder {str(path)!r} is not writable: {exc}") from None
    return Storage(uri=str(path), filesystem=pafs.LocalFileSystem(), root=str(path), is_s3=False)


def open_storage(cfg: StorageConfig) -> Storage:
    """Open and check the storage named by ``cfg.uri``; problems raise StorageError."""
    uri = cfg.uri.strip()
    if uri.startswith("s3://"):
        return _open_s3(cfg, uri)
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]+):", uri)
    # "s3:/x" or "gs://x" would otherwise become odd local folder names; a Windows drive
    # letter ("C:") is one character and does not match.
    if not uri or scheme:
        raise StorageError(f"storage URI {uri!r} is not supported; allowed: {ALLOWED_FORMS}")
    return _open_local(uri)


def _with_retries(uri: str, what: str, path: str, call: Callable[[], T]) -> T:
    """Retry ``call`` like ``Storage._retry`` (same budget, same warnings)."""
    store = Storage(uri=uri, filesystem=pafs.LocalFileSystem(), root="", is_s3=True)
    return store._retry(what, path, call)


class _RetryingUpload:
    """A write-only file that buffers, then uploads on ``close()`` with retries: an S3 upload
    cut by an outage is repeated whole (a multipart upload that never completes leaves no
    object, so readers never see half a file)."""

    def __init__(self, fs: pafs.FileSystem, uri: str, path: str) -> None:
        self.fs, self.uri, self.path = fs, uri, path
        self.buffer = bytearray()
        self.closed = False

    def write(self, data: bytes) -> int:
        self.buffer += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        def put() -> None:
            with self.fs.open_output_stream(self.path) as out:
                out.write(bytes(self.buffer))

        _with_retries(self.uri, "write", self.path, put)


class RetryingS3Handler(pafs.FileSystemHandler):
    """Every operation of an S3 filesystem, retried with backoff across an outage.

    Ray Train writes checkpoints and its own checkpoint index (checkpoint_manager_snapshot.json,
    written by the controller, whose failure Ray does not retry) through the filesystem it is
    given; the SDK's own per-request retries last only a few seconds against a refused
    connection. Wrapped in ``pyarrow.fs.PyFileSystem`` and handed to Ray instead."""

    def __init__(self, fs: pafs.FileSystem, uri: str) -> None:
        self.fs, self.uri = fs, uri

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingS3Handler) and self.fs.equals(other.fs)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __reduce__(self) -> tuple:
        return RetryingS3Handler, (self.fs, self.uri)

    def _do(self, what: str, path: str, call: Callable[[], T]) -> T:
        return _with_retries(self.uri, what, path, call)

    def get_type_name(self) -> str:
        return "raygan-retrying-s3"

    def normalize_path(self, path: str) -> str:
        return self.fs.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._do("stat", ",".join(paths), lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._do("list", selector.base_dir, lambda: self.fs.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._do("mkdir", path, lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._do("delete", path, lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._do(
            "delete",
            path,
            lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok),
        )

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of the whole bucket root")

    def delete_file(self, path: str) -> None:
        self._do("delete", path, lambda: self.fs.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._do("move", src, lambda: self.fs.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._do("copy", src, lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path: str) -> pa.NativeFile:
        data = self._do("read", path, lambda: _read_all(self.fs, path))
        return pa.BufferReader(data)

    def open_input_file(self, path: str) -> pa.NativeFile:
        data = self._do("read", path, lambda: _read_all(self.fs, path))
        return pa.BufferReader(data)

    def open_output_stream(self, path: str, metadata: dict | None = None) -> pa.NativeFile:
        return pa.PythonFile(_RetryingUpload(self.fs, self.uri, path), mode="w")

    def open_append_stream(self, path: str, metadata: dict | None = None) -> pa.NativeFile:
        raise OSError("S3 has no append")


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    # Whole-file reads: checkpoint files are megabytes; a retry restarts the read cleanly.
    with fs.open_input_file(path) as src:
        return src.read()


def ray_storage_args(storage: Storage) -> dict:
    """Keyword arguments for ``ray.train.RunConfig`` that put the run under ``storage``."""
    if storage.is_s3:
        # With a filesystem given, Ray wants the path inside it: "bucket/prefix", no "s3://".
        retrying = pafs.PyFileSystem(RetryingS3Handler(storage.filesystem, storage.uri))
        return {"storage_path": storage.root, "storage_filesystem": retrying}
    return {"storage_path": storage.root}
