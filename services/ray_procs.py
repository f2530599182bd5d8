"""The processes of raygan's private Ray, read from /proc (Linux): which they are, where they
listen, and stopping those a killed driver left behind.

A private Ray's processes are told apart by the session folder they hold files open in: every
one of them (GCS, raylet, dashboard and its modules, monitors, both agents, every worker)
writes its logs under ``<Ray temp folder>/session_<time>_<driver pid>/logs`` and keeps them
open while it runs. ``services.launch.init_ray`` writes ``DRIVER_FILE`` into the session folder
of each private Ray it starts, naming the driver by pid *and* start time:

- a session folder without that file is not raygan's private Ray (the user's ``ray start``,
  another program's ``ray.init``): nothing of it is ever touched;
- its driver is alive exactly when a process with that pid and that start time exists, which a
  reused pid cannot fake.

Neither a process's command line nor its environment can serve as the marker: Ray's agents
rename themselves (``ray::DashboardAgent``) with setproctitle, which overwrites both as
/proc shows them (measured: the agents' /proc/PID/environ lost all but 8 variables).

Elsewhere (no /proc) every function here finds nothing.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DRIVER_FILE = "raygan_driver"
PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's "st" column


@dataclass(frozen=True)
class Owner:
    """The driver that started a private Ray: pid and start time (clock ticks after boot,
    field 22 of /proc/PID/stat)."""

    pid: int
    start: int

    def alive(self) -> bool:
        return process_alive(self.pid, self.start)


@dataclass(frozen=True)
class RayProc:
    pid: int
    start: int
    name: str
    session: str  # the session folder's path


@dataclass(frozen=True)
class Listener:
    pid: int
    name: str
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.ip)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{self.name} (pid {self.pid}) on {host}:{self.port}"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid``, or None when there is no such process."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def process_alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` runs (not a zombie) and, with ``start`` (from ``start_time``), is the
    process that started then: a reused pid has another start time. Without /proc (macOS),
    only whether the pid exists."""
    if not (PROC / "self" / "stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z" and (start is None or stat[1] == start)


def temp_root() -> str:
    """The folder Ray keeps its sessions in for a ``ray.init`` from this process's environment
    (as ``ray._common.utils.get_default_ray_temp_dir``: RAY_TMPDIR, else TMPDIR, else /tmp;
    plus "ray"), resolved as /proc shows open files."""
    base = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
    return os.path.realpath(os.path.join(base, "ray"))


def claim(session_dir: str) -> Owner:
    """Write ``DRIVER_FILE`` (this process) into ``session_dir``; returns the owner written."""
    owner = Owner(os.getpid(), start_time(os.getpid()) or 0)
    path = Path(session_dir) / DRIVER_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{owner.pid} {owner.start}\n")
    tmp.replace(path)  # whole or absent, for a reader racing this write
    return owner


def session_owner(session_dir: str) -> Owner | None:
    """The raygan driver ``session_dir`` was claimed by, or None (not raygan's)."""
    try:
        pid, start = (Path(session_dir) / DRIVER_FILE).read_text().split()
        return Owner(int(pid), int(start))
    except (OSError, ValueError):
        return None


def proc_name(pid: int) -> str:
    """A short name: Ray's own title (``ray::DashboardAgent``, ``ray::IDLE``), else the program
    or script (``gcs_server``, ``raylet``, ``dashboard.py``)."""
    args = _cmdline(pid)
    if not args:
        return "?"
    if args[0].startswith(("ray::", "ray-dashboard-")):
        return args[0].split()[0]
    scripts = [a for a in args if a.endswith(".py")]
    return os.path.basename(scripts[0] if scripts else args[0].split()[0])


def _cmdline(pid: int) -> list[str]:
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _ray_dir() -> str:
    import importlib.util

    spec = importlib.util.find_spec("ray")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return os.path.realpath(locations[0]) + os.sep if locations else "\0"


def _is_ray_program(pid: int, ray_dir: str) -> bool:
    """Ray's own process, not another program that holds one of its log files open (a
    ``tail -f`` of a worker log): Ray's title, or a program or script of the installed ray."""
    args = _cmdline(pid)
    if args and args[0].startswith(("ray::", "ray-dashboard-")):
        return True
    return any(os.path.realpath(a).startswith(ray_dir) for a in args[:3] if a.startswith("/"))


def ray_processes(root: str) -> list[RayProc]:
    """Every Ray process of this user (other than this one) holding files open in a session
    folder under ``root``, with that folder."""
    if not PROC.is_dir():
        return []
    ray_dir = _ray_dir()
    found = []
    me = os.getpid()
    for entry in PROC.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        session = _session_of(pid, root)
        stat = _stat(pid)
        if session is None or stat is None or stat[0] == "Z":
            continue
        if _is_ray_program(pid, ray_dir):
            found.append(RayProc(pid, stat[1], proc_name(pid), session))
    return found


def _session_of(pid: int, root: str) -> str | None:
    """The session folder under ``root`` that ``pid`` holds a file open in, if any."""
    try:
        fds = list((PROC / str(pid) / "fd").iterdir())
    except OSError:  # another user's process, or gone
        return None
    prefix = os.path.join(root, "session_")
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(prefix):
            return os.path.join(root, target[len(root) + 1 :].split(os.sep)[0])
    return None


def session_pids(session_dir: str) -> list[int]:
    """This process and every other Ray process holding files in ``session_dir``."""
    session_dir = os.path.realpath(session_dir)
    procs = ray_processes(os.path.dirname(session_dir))
    return [os.getpid(), *(p.pid for p in procs if p.session == session_dir)]


def _socket_table() -> dict[int, tuple[str, int]]:
    """Listening TCP sockets of this network namespace: inode -> (ip, port)."""
    table = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = (PROC / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != _LISTEN:
                continue
            hexip, hexport = f[1].split(":")
            raw = bytes.fromhex(hexip)
            # The kernel prints the address as host-order 32-bit words.
            raw = b"".join(struct.pack("<I", w) for w in struct.unpack(f">{len(raw) // 4}I", raw))
            table[int(f[9])] = (socket.inet_ntop(family, raw), int(hexport, 16))
    return table


def listeners(pids: Iterable[int]) -> list[Listener]:
    """Every listening TCP socket (IPv4 and IPv6) that one of ``pids`` holds open."""
    table = _socket_table()
    out = set()
    for pid in pids:
        try:
            fds = list((PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        name = proc_name(pid)
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and (inode := int(target[8:-1])) in table:
                out.add(Listener(pid, name, *table[inode]))
    return sorted(out, key=lambda s: (s.pid, s.port, s.ip))


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or an IPv4-mapped loopback (``::ffff:127.0.0.1``: what an IPv6 socket
    bound to 127.0.0.1 shows); never 0.0.0.0 or ``::`` (every interface)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _signal(proc: RayProc, sig: int) -> bool:
    """Send ``sig`` to ``proc`` if that pid is still the same process (start time checked);
    through a pidfd where the platform has one, so a pid reused after the check is never hit."""
    try:
        if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
            fd = os.pidfd_open(proc.pid)
            try:
                if start_time(proc.pid) != proc.start:
                    return False
                signal.pidfd_send_signal(fd, sig)
            finally:
                os.close(fd)
        elif start_time(proc.pid) == proc.start:
            os.kill(proc.pid, sig)
        else:
            return False
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _gone(proc: RayProc) -> bool:
    stat = _stat(proc.pid)
    return stat is None or stat[1] != proc.start or stat[0] == "Z"


def stop(procs: list[RayProc], grace_s: float = 3.0) -> list[RayProc]:
    """SIGTERM ``procs``, SIGKILL those still there after ``grace_s``; returns those still
    running after that (none, unless signals were refused). Ray's agents, orphaned, outlived
    a SIGTERM by over 30 s when measured: the grace is short on purpose."""
    for proc in procs:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.05)
    for proc in procs:
        if not _gone(proc):
            _signal(proc, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and not all(_gone(p) for p in procs):
        time.sleep(0.05)
    return [p for p in procs if not _gone(p)]


def leftovers(root: str) -> dict[Owner, list[RayProc]]:
    """Processes of raygan private Rays under Ray temporary folder ``root`` whose driver is
    dead, by driver. Sessions raygan did not claim, or whose driver lives, are left alone, and
    so are Rays under another folder (another test's, or another setup's)."""
    by_session: dict[str, list[RayProc]] = {}
    for proc in ray_processes(root):
        by_session.setdefault(proc.session, []).append(proc)
    dead: dict[Owner, list[RayProc]] = {}
    for session, procs in by_session.items():
        owner = session_owner(session)
        if owner is not None and not owner.alive():
            dead.setdefault(owner, []).extend(procs)
    return dead
