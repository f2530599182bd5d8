"""One writer per run: a lease object in the run's storage folder.

Two jobs with one name and one storage would both train from the same checkpoints and write
into one folder (and one MLflow run). The first driver creates ``NAME/lease.json`` atomically
(a local exclusive create; on S3 a conditional PUT, ``If-None-Match: *``) and renews it every
quarter of ``storage.lease_seconds`` while it runs; a second driver finds it held and is refused
at once, told who holds it. A crashed holder does not block its rerun for long:

- on the same machine (same host name and boot), the holder is dead when its PID is gone or
  belongs to another process (start time differs): the rerun takes over at once;
- elsewhere, the holder is presumed dead once it has not renewed for ``storage.lease_seconds``
  (the machines' clocks are assumed to agree to within a fraction of that, as NTP gives);
- ``--force`` takes over whatever the lease says, for an operator who knows the holder is dead.

A holder whose lease was taken over stops its job (as Ctrl+C would) rather than race the new
writer. Renewal failures from a storage outage only warn: the job goes on, and the lease goes
stale as for a dead holder if the outage outlasts ``storage.lease_seconds``.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services import ray_procs
from services.storage import Storage, StorageError, _endpoint, _parse_s3

log = logging.getLogger("raygan")

LEASE_FILE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another live job holds the run's lease."""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def holder_alive(holder: dict[str, Any], timeout_s: float, now: float | None = None) -> bool:
    """Whether the job that wrote ``holder`` (a lease's content) is presumed alive."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id():
        # Same machine and boot: the process table knows, no need to wait for a timeout.
        return ray_procs.process_alive(int(holder.get("pid", 0)), holder.get("pid_start"))
    return now - float(holder.get("renewed_at", 0)) <= timeout_s


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started_at", 0))))
    silent = max(0.0, now - float(holder.get("renewed_at", 0)))
    return (
        f"{holder.get('command', 'a job')} on host {holder.get('host', '?')}, pid "
        f"{holder.get('pid', '?')}, started {started}, last renewed {silent:.0f} s ago"
    )


class _LocalBackend:
    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, body: bytes) -> Any:
        """Create the lease if absent; returns a version tag, or None if it exists."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as out:
            out.write(body)
        return json.loads(body)["token"]

    def read(self) -> tuple[dict[str, Any], Any] | None:
        try:
            holder = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            # Cut short (a crash between create and write): nobody can be renewing it.
            return {"renewed_at": 0, "token": ""}, ""
        return holder, holder.get("token", "")

    def replace(self, body: bytes, version: Any) -> Any:
        """Write ``body`` if the lease is still at ``version``; None if someone else's now."""
        current = self.read()
        if current is None or current[1] != version:
            return None
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}")
        tmp.write_bytes(body)
        os.replace(tmp, self.path)
        return json.loads(body)["token"]

    def take(self, version: Any) -> bool:
        """Remove the lease if it is still at ``version``. The rename is atomic, so of two
        jobs taking over one stale lease only one moves it; the loser sees it gone."""
        aside = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_bytes()).get("token", "")
        except ValueError:
            moved = ""
        if moved != version:
            # A fresh lease created between our read and the rename: put it back.
            os.rename(aside, self.path)
            return False
        aside.unlink(missing_ok=True)
        return True

    def delete(self, version: Any) -> None:
        self.take(version)


class _S3Backend:
    """Conditional requests through boto3 (pyarrow's S3 filesystem cannot send them)."""

    def __init__(self, storage: Storage, endpoint: tuple[str, str] | None, key: str) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, prefix = _parse_s3(storage.uri)
        self.key = f"{prefix}/{key}" if prefix else key
        url = f"{endpoint[1]}://{endpoint[0]}" if endpoint else None
        self.client = boto3.client(
            "s3",
            endpoint_url=url,
            region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
            config=Config(
                connect_timeout=3, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"}
            ),
        )

    @staticmethod
    def _code(exc: Exception) -> str:
        response = getattr(exc, "response", {}) or {}
        return str(response.get("Error", {}).get("Code", ""))

    def create(self, body: bytes) -> Any:
        try:
            out = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*"
            )
        except Exception as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return None
            raise
        return out["ETag"]

    def read(self) -> tuple[dict[str, Any], Any] | None:
        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if self._code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        try:
            holder = json.loads(out["Body"].read())
        except ValueError:
            holder = {"renewed_at": 0, "token": ""}
        return holder, out["ETag"]

    def replace(self, body: bytes, version: Any) -> Any:
        try:
            out = self.client.put_object(
                Bucket=self.bucket, Key=self.key, Body=body, IfMatch=version
            )
        except Exception as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return None
            raise
        return out["ETag"]

    def take(self, version: Any) -> bool:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=version)
        except Exception as exc:
            if self._code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                return False
            raise
        return True

    def delete(self, version: Any) -> None:
        self.take(version)


@dataclass
class RunLease:
    """A held lease; ``release()`` (or leaving the ``with`` block) gives it back."""

    name: str
    where: str
    timeout_s: float
    _backend: Any
    _holder: dict[str, Any]
    _version: Any
    _stop: threading.Event
    _thread: threading.Thread | None = None
    lost: bool = False

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="raygan-lease", daemon=True)
        self._thread.start()

    def renew(self) -> bool:
        """Renew once; False when the lease is someone else's now (taken over)."""
        holder = {**self._holder, "renewed_at": time.time()}
        version = self._backend.replace(json.dumps(holder).encode(), self._version)
        if version is None:
            return False
        self._holder, self._version = holder, version
        return True

    def _renew_loop(self) -> None:
        warned = False
        while not self._stop.wait(self.timeout_s / 4):
            try:
                if self.renew():
                    warned = False
                    continue
            except Exception as exc:  # an outage: the job goes on, the lease may go stale
                if not warned:
                    log.warning("could not renew the lease %s (%s); will retry", self.where, exc)
                    warned = True
                continue
            self.lost = True
            current = self._backend.read()
            by = describe(current[0]) if current else "nobody (removed)"
            log.error(
                "the lease %s was taken over by %s: stopping this job so that one writer is left",
                self.where,
                by,
            )
            # As Ctrl+C would: the driver stops its workers and exits 130.
            _thread.interrupt_main(signal.SIGINT)
            return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.lost:
            return
        try:
            self._backend.delete(self._version)
        except Exception as exc:
            log.warning(
                "could not remove the lease %s (%s); it goes stale on its own", self.where, exc
            )


def acquire(
    storage: Storage,
    name: str,
    command: str,
    timeout_s: float,
    force: bool = False,
    endpoint: tuple[str, str] | None = None,
    renew: bool = True,
) -> RunLease:
    """Take the lease of run (or sweep) ``name`` in ``storage``; raises LeaseHeld naming the
    live holder. ``endpoint`` is the S3 endpoint (``services.storage._endpoint``)."""
    relpath = f"{name}/{LEASE_FILE}"
    where = storage.run_uri(relpath)
    backend: Any
    if storage.is_s3:
        backend = _S3Backend(storage, endpoint, relpath)
    else:
        backend = _LocalBackend(Path(storage.root) / name / LEASE_FILE)
    pid = os.getpid()
    now = time.time()
    holder = {
        "token": uuid.uuid4().hex,
        "command": command,
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "pid": pid,
        "pid_start": ray_procs.start_time(pid),
        "started_at": now,
        "renewed_at": now,
        "timeout_s": timeout_s,
    }
    body = json.dumps(holder).encode()
    try:
        for _ in range(3):
            version = backend.create(body)
            if version is not None:
                break
            current = backend.read()
            if current is None:
                continue  # released between our create and read: try again
            other, other_version = current
            if not force and holder_alive(other, timeout_s, now):
                raise LeaseHeld(
                    f"{name} is being written by another job: {describe(other, now)} "
                    f"(lease {where}). Wait for it to end; if that job is dead, rerun with "
                    f"--force to take over"
                    + (
                        ""
                        if other.get("host") == holder["host"]
                        else f" (or wait {timeout_s:.0f} s without renewal: it then goes stale)"
                    )
                )
            if backend.take(other_version):
                log.warning(
                    "took over the lease of %s from %s (%s)",
                    name,
                    describe(other, now),
                    "--force" if force else "its holder is dead",
                )
        else:
            raise LeaseHeld(f"{name}: could not take the lease {where} (others racing for it)")
    except LeaseHeld:
        raise
    except Exception as exc:
        raise StorageError(f"cannot take the lease {where}: {exc}") from None
    lease = RunLease(
        name=name,
        where=where,
        timeout_s=timeout_s,
        _backend=backend,
        _holder=holder,
        _version=version,
        _stop=threading.Event(),
    )
    if renew:
        lease.start_renewing()
    return lease


def acquire_for(
    storage: Storage, cfg_storage: Any, name: str, command: str, force: bool
) -> RunLease:
    """``acquire`` with the settings of a ``StorageConfig``."""
    endpoint = _endpoint(cfg_storage) if storage.is_s3 else None
    return acquire(storage, name, command, cfg_storage.lease_seconds, force, endpoint)
