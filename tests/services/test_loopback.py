"""raygan's private Ray on a real machine: every socket it listens on is loopback, and a start
after a killed driver stops what that driver's Ray left running, and nothing else.

Each driver is a subprocess that calls ``services.launch.init_ray`` and waits on its stdin. What
the assertions measure is found here without ``services.ray_procs`` (used only to cross-check
its session lookup, and to clean up): while a driver lives, its Ray's processes are its
descendants (GCS, raylet, dashboard, monitor are its children; the agents and workers the
raylet's), and their sockets come from /proc/net/tcp and tcp6 through the socket inodes in
/proc/PID/fd.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services import ray_procs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
]

REPO = Path(__file__).resolve().parents[2]
# The processes every private Ray runs from its start: the test waits for them all.
CORE = {"gcs_server", "raylet", "dashboard.py", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}
DRIVER = """
import logging, sys
logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", stream=sys.stderr)
from services.launch import init_ray
init_ray(num_cpus=1)
print("UP", flush=True)
sys.stdin.read()
"""


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(ppid, state, start time) of ``pid``, or None when there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0], int(fields[19])


def _running(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[1] != "Z"


def _name(pid: int) -> str:
    try:
        args = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    first = args[0].decode(errors="replace") if args else "?"
    if first.startswith("ray::"):
        return first.split()[0]
    scripts = [a.decode() for a in args if a.endswith(b".py")]
    return os.path.basename(scripts[0] if scripts else first.split()[0])


def _descendants(root: int) -> dict[int, int]:
    """pid -> start time of every live descendant of ``root``."""
    children: dict[int, list[int]] = {}
    starts = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) and stat[1] != "Z":
            children.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = starts[child]
            todo.append(child)
    return found


def _listening() -> dict[int, tuple[str, int]]:
    """inode -> (ip, port) of every listening TCP socket, IPv4 and IPv6."""
    table = {}
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            hexip, hexport = f[1].split(":")
            words = struct.unpack(f">{len(hexip) // 8}I", bytes.fromhex(hexip))
            raw = b"".join(struct.pack("<I", w) for w in words)
            table[int(f[9])] = (socket.inet_ntop(family, raw), int(hexport, 16))
    return table


def _sockets(pids: list[int]) -> list[tuple[str, int, str, int]]:
    """(process name, pid, ip, port) of every listening socket that ``pids`` hold."""
    table, out = _listening(), set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone meanwhile (a worker that exited)
            continue
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in table:
                out.add((_name(pid), pid, *table[int(link[8:-1])]))
    return sorted(out)


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


@dataclass
class Driver:
    """A driver subprocess that started a private Ray, and the processes of that Ray."""

    proc: subprocess.Popen[str]
    out: Path
    err: Path
    procs: dict[int, int] = field(default_factory=dict)  # pid -> start time
    session: Path | None = None  # Ray names it session_<time>_<driver pid>

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.err.read_text()

    def names(self) -> set[str]:
        return {_name(pid) for pid in self.procs}

    def stop(self) -> None:
        """Close stdin (the driver returns, ray.shutdown runs at exit), else kill it."""
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _start(root: Path, tag: str, env: dict[str, str]) -> Driver:
    out, err = root / f"{tag}.out", root / f"{tag}.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=o,
            stderr=e,
            text=True,
        )
    return Driver(proc, out, err)


def _wait_up(driver: Driver, root: Path, timeout: float = 120) -> None:
    """Until the driver printed UP and its Ray's core processes are all there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert driver.proc.poll() is None, f"driver exited:\n{driver.log()}"
        if "UP" in driver.out.read_text():
            driver.procs = _descendants(driver.pid)
            found = list((root / "ray").glob(f"session_2*_{driver.pid}"))
            if CORE <= driver.names() and len(found) == 1:
                driver.session = found[0]
                return
        time.sleep(0.25)
    raise AssertionError(f"no private Ray up in {timeout} s: {driver.names()}\n{driver.log()}")


def _sweep(drivers: list[Driver], extra: list[tuple[int, int]]) -> None:
    """SIGKILL, by pid with start time checked, whatever the test's drivers left running:
    the processes recorded, and any process holding files in one of their session folders."""
    doomed = [(p, s) for d in drivers for p, s in d.procs.items()] + extra
    sessions = {str(d.session) for d in drivers if d.session}
    roots = {str(d.session.parent) for d in drivers if d.session}
    for root in roots:
        doomed += [(p.pid, p.start) for p in ray_procs.ray_processes(root) if p.session in sessions]
    for pid, start in doomed:
        if _running(pid, start):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_root() -> Iterator[tuple[Path, dict[str, str]]]:
    # Short: Ray's socket paths under it must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="lb", dir="/tmp"))
    env = {**os.environ, "RAY_TMPDIR": str(root), "AWS_EC2_METADATA_DISABLED": "true"}
    env.pop("RAY_ADDRESS", None)
    env.pop("GLOO_SOCKET_IFNAME", None)
    yield root, env
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def live(ray_root: tuple[Path, dict[str, str]]) -> Iterator[Driver]:
    """A driver that stays alive for the module: its Ray is measured, and must survive the
    next driver's clean-up."""
    root, env = ray_root
    driver = _start(root, "live", env)
    try:
        _wait_up(driver, root)
        yield driver
    finally:
        driver.stop()
        _sweep([driver], [])


def test_every_socket_of_the_private_ray_is_loopback(live: Driver) -> None:
    time.sleep(1)  # for a listener opened late (all were up when ray.init returned, measured)
    pids = [live.pid, *_descendants(live.pid)]
    sockets = _sockets(pids)
    names = {name for name, *_ in sockets}
    # The GCS, raylet, dashboard and both agents listen somewhere: proves the scan sees them.
    assert CORE <= names, sockets
    assert len(sockets) >= 8, sockets
    exposed = [s for s in sockets if not _loopback(s[2])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert "listens beyond" not in live.log()
    # The driver claimed its session, and every Ray process of it is found through that
    # folder: what the clean-up of a later start relies on (the agents' command lines and
    # environments no longer name their session).
    assert live.session is not None
    owner = ray_procs.session_owner(str(live.session))
    assert owner is not None and owner.pid == live.pid and owner.alive()
    found = set(ray_procs.session_pids(str(live.session)))
    ray_named = {p for p in pids[1:] if _name(p) in CORE or _name(p).startswith("ray::")}
    missed = [(p, _name(p)) for p in ray_named - found if _stat(p) is not None]
    assert not missed, f"not found through the session folder: {missed}"


# Two processes started outside raygan, orphaned like the leftovers, that the clean-up must not
# stop: a reader of the killed driver's log (not a Ray program), and a Ray-titled process of a
# session folder raygan never claimed (what a user's own ``ray start`` looks like).
DECOYS = r"""
import os, subprocess, sys
log, foreign = sys.argv[1], sys.argv[2]
os.makedirs(os.path.dirname(foreign), exist_ok=True)
# Not on this process's pipes: the test reads its output to the end.
quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
tail = subprocess.Popen(["tail", "-f", log], **quiet)
ray_like = subprocess.Popen(
    ["bash", "-c", 'exec -a ray::DashboardAgent sleep 120 3>>"$0"', foreign], **quiet)
print(tail.pid, ray_like.pid)
"""


def test_start_after_a_killed_driver_stops_its_leftovers_only(
    ray_root: tuple[Path, dict[str, str]], live: Driver
) -> None:
    root, env = ray_root
    killed = _start(root, "killed", env)
    decoys: list[tuple[int, int]] = []
    later: Driver | None = None
    try:
        _wait_up(killed, root)
        assert killed.session is not None
        killed.proc.kill()
        killed.proc.wait()
        time.sleep(1)
        left = {pid: s for pid, s in killed.procs.items() if _running(pid, s)}
        # What the issue reports: the agents outlive their SIGKILLed driver, orphaned.
        assert {"ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= {_name(p) for p in left}
        foreign = root / "ray" / "session_2000-01-01_00-00-00_000000_1" / "logs" / "agent.log"
        spawner = subprocess.run(
            [sys.executable, "-c", DECOYS, str(killed.session / "logs" / "raylet.out"), foreign],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        for pid in map(int, spawner.stdout.split()):
            decoys.append((pid, _stat(pid)[2]))  # type: ignore[index]
        deadline = time.monotonic() + 10  # until bash has exec'd sleep with its title
        while time.monotonic() < deadline and _name(decoys[1][0]) != "ray::DashboardAgent":
            time.sleep(0.05)
        live_procs = dict(live.procs)

        later = _start(root, "later", env)
        _wait_up(later, root)

        still = [(pid, _name(pid)) for pid, s in left.items() if _running(pid, s)]
        assert not still, f"left by the killed driver, still running: {still}"
        line = [ln for ln in later.log().splitlines() if "left by killed raygan driver" in ln]
        assert len(line) == 1, later.log()
        assert f"driver(s) {killed.pid}:" in line[0]
        assert "ray::DashboardAgent" in line[0] and "ray::RuntimeEnvAgent" in line[0]
        assert "could not stop" not in line[0]
        # Neither outsider, nor anything of the live driver's Ray, was touched.
        stopped = [(p, _name(p)) for p, s in decoys if not _running(p, s)]
        assert not stopped, f"processes raygan does not own were stopped: {stopped}"
        gone = [(p, _name(p)) for p, s in live_procs.items() if not _running(p, s)]
        assert not [g for g in gone if g[1] in CORE], f"the live driver's Ray lost {gone}"
        assert live.proc.poll() is None
    finally:
        if later is not None:
            later.stop()
        _sweep([killed, *([later] if later else [])], decoys)


def test_a_ddp_job_on_the_private_ray_listens_on_loopback_only(
    ray_root: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    """The Train workers' sockets too: torch's rendezvous store (rank 0) and gloo's pairs. The
    store listened on every interface before services/ddp_store.py."""
    root, env = ray_root
    hold = tmp_path / "hold"
    hold.write_text("15")  # the workers wait at step 15 while the test looks
    job_env = {**env, "RAYGAN_HOLD_FILE": str(hold), "PYTHONUNBUFFERED": "1"}
    tiny = ["generators.width=32", "discriminator.width=32", "train.batch_size=32"]
    tiny += ["eval.every=10", "eval.samples=200", "tracking.enabled=false", "train.steps=20"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.train", "--config", "ring8", *tiny]
        + [f"storage.uri={tmp_path / 'runs'}", "resources.num_workers=2", "name=lb"],
        cwd=REPO,
        env=job_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    procs: dict[int, int] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "[raygan] step 10/" in line:
                break
        time.sleep(2)  # both ranks are at the hold by now
        procs = _descendants(proc.pid)
        sockets = _sockets([proc.pid, *procs])
        workers = [s for s in sockets if "RayTrainWorker" in s[0]]
        assert workers, sockets  # the store (rank 0) and gloo listen in the Train workers
        exposed = [s for s in sockets if not _loopback(s[2])]
        assert not exposed, f"listening beyond loopback: {exposed}"
        hold.unlink()
        rest, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, rest[-3000:]
        assert "[raygan] done: 20 steps" in rest
    finally:
        hold.unlink(missing_ok=True)
        proc.kill()
        proc.wait()
        for pid, start in procs.items():
            if _running(pid, start):
                os.kill(pid, signal.SIGKILL)
