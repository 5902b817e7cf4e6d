"""Real servers inside testbed pods, run as non-root users, for the router's end-to-end tests
and `bench/bench_real_servers.py`.

Each server is a context manager that starts it in a pod (or node) with `Testbed.popen`, on
the pod's IP (or the node's underlay IP), waits until it listens, yields what a client needs,
and on the way out stops it (its signal first, then SIGKILL for its whole process tree),
waits for every process, and removes its own temporary directory:

- `nginx_server`: master as root, two workers as nobody/nogroup, sendfile, keep-alive, a
  1 MiB file and a small one, an access log that tells complete responses from cut ones;
- `postgres_server`: initdb and postgres as the `postgres` user (trust auth for the pod
  networks, fsync off), `pgbench -i` from a pod on another node;
- `python_server_as`: a checking stream server (the demo's protocol) as uid 65534;
- `fork_after_accept_server`: accept, fork, the parent closes its copy at once;
- `prefork_server`: N forked workers accepting on one inherited listener;
- `StreamClient` / `fork_after_connect_client`: the checking client, optionally forking
  after its connect (the parent closes its fd, the child sends).

The Python helpers are `realservers_apps.py` (stdlib only): a copy goes into each server's
temporary directory, run by a Python interpreter the user may execute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from truepeer import kernel_peer  # (tests/ebpfrouter is on sys.path)

from ebpfrouter.testbed import Testbed

APPS = Path(__file__).resolve().with_name("realservers_apps.py")
NOBODY = 65534  # nobody / nogroup on Debian
NOGROUP = 65534


class RealServerError(RuntimeError):
    """A real server or client did not start; the message names it and shows its log."""


# -- processes ---------------------------------------------------------------------------------


def pg_bin(name: str) -> str:
    """`name` from the newest /usr/lib/postgresql/*/bin (Debian's layout)."""
    def version(path: str) -> int:
        part = Path(path).parent.name
        return int(part) if part.isdigit() else 0

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.access(Path(bindir) / name, os.X_OK):
            return str(Path(bindir) / name)
    raise RealServerError(f"no {name} in /usr/lib/postgresql/*/bin (Debian package postgresql)")


def _others_may_run(path: str) -> bool:
    """Whether a user that is neither owner nor group may execute `path` (every directory on
    the way searchable by others, the file executable by others)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & stat.S_IXOTH:
            return False
        return all(p.stat().st_mode & stat.S_IXOTH for p in real.parents)
    except OSError:
        return False


def python_for(uid: int) -> str:
    """A Python interpreter `uid` may execute (this one for root; a venv or pyenv Python
    under /root is out of reach of other users, so the system one then)."""
    if uid == 0:
        return sys.executable
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if candidate and _others_may_run(candidate):
            return os.path.realpath(candidate)
    raise RealServerError(f"no Python interpreter that uid {uid} may execute")


def as_user(argv: Sequence[str], uid: int, gid: int | None = None) -> list[str]:
    """`argv` run as `uid` (and `gid`, default: the same number) with no supplementary groups
    and a fresh environment, via setpriv (so that `Testbed.popen` can setns first as root)."""
    if uid == 0:
        return list(argv)
    return ["setpriv", f"--reuid={uid}", f"--regid={uid if gid is None else gid}",
            "--clear-groups", "--reset-env", "--", *argv]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] state, [1] ppid, [2] pgrp, ... [19] starttime


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        out.append(child)
        todo += children.get(child, [])
    return out


def uid_of(pid: int) -> int:
    """Real uid of `pid` (-1 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    return -1


def _alive(pid: int, start: str) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z" and fields[19] == start


def stop_tree(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
              grace: float = 5.0) -> None:
    """Stop `proc` and everything it forked: `sig` to `proc` (its own clean shutdown), then,
    after `grace`, SIGKILL to every process of the tree seen before and to its process group
    (children that called setsid(), as PostgreSQL's do, are killed by pid); wait for all.
    Only processes of that tree are signalled (pid and start time checked)."""
    tree = [(pid, f[19]) for pid in descendants(proc.pid) if (f := _stat_fields(pid))]
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
    proc.wait()
    for pid, start in tree:
        if _alive(pid, start):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_alive(pid, start) for pid, start in tree) and time.monotonic() < deadline:
        time.sleep(0.02)


def _read_line(proc: subprocess.Popen[bytes], what: str, timeout: float,
               log: Path | None = None) -> str:
    """The first line `proc` prints on its stdout (a pipe), read without blocking past
    `timeout`; a process that exits first is an error naming `what` (with its log)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RealServerError(f"{what}: no line within {timeout} s{_tail(log)}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            data = os.read(fd, 4096)
            if not data:
                proc.wait(5)
                raise RealServerError(f"{what} exited with {proc.returncode}{_tail(log)}")
            buf += data
    return buf.split(b"\n", 1)[0].decode()


def _tail(log: Path | None, n: int = 1500) -> str:
    if log is None:
        return ""
    with contextlib.suppress(OSError):
        return f"; its log:\n{log.read_text(errors='replace')[-n:]}"
    return ""


def _workdir(what: str, owner: int = 0) -> Path:
    """A fresh temporary directory searchable by everyone, owned by `owner`."""
    path = Path(tempfile.mkdtemp(prefix=f"er-{what}-"))
    path.chmod(0o755)
    if owner:
        os.chown(path, owner, pwd.getpwuid(owner).pw_gid)
    return path


def _wait_listening(bed: Testbed, target: str, host: str, port: int, proc: subprocess.Popen[Any],
                    what: str, log: Path | None = None, timeout: float = 20.0) -> None:
    """Wait until `host:port` is in LISTEN state in `target` (no probe connection)."""
    want_port = f":{port:04X}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RealServerError(f"{what} exited with {proc.returncode}{_tail(log)}")
        out = bed.run(target, ["cat", "/proc/net/tcp"]).stdout
        for line in out.splitlines()[1:]:
            cols = line.split()
            if len(cols) > 3 and cols[1].endswith(want_port) and cols[3] == "0A":
                return
        if time.monotonic() > deadline:
            raise RealServerError(f"{what}: nothing listens on {host}:{port} after {timeout} s"
                                  f"{_tail(log)}")
        time.sleep(0.05)


# -- where things run ----------------------------------------------------------------------------


def address_of(bed: Testbed, target: str) -> str:
    """The address a server in `target` listens on: a pod's IP, or a node's underlay IP."""
    with contextlib.suppress(Exception):
        return bed.pod(target).ip
    return bed.node(target).underlay_ip


def other_side(bed: Testbed, target: str) -> str:
    """Where a client of a server in `target` runs: the first pod on another node (or, for a
    node, another node)."""
    for pod in bed.pods:
        if target == pod.name:
            return next(p.name for p in bed.pods if p.node != pod.node)
    return next(n.name for n in bed.nodes if n.name != bed.node(target).name)


def tcp_peers(pids: Iterable[int]) -> dict[int, list[tuple[str, int]]]:
    """Peer address of every connected TCP socket each process holds, as its fds see them
    now (read from a `pidfd_getfd` copy, so a swapped socket shows its host-network peer)."""

    out: dict[int, list[tuple[str, int]]] = {}
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        peers = []
        for name in names:
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except OSError:
                continue
            found = kernel_peer(pid, int(name))  # (getpeername: virtualized)
            if found is not None:
                peers.append(found)
        out[pid] = peers
    return out


# -- the Python helpers (realservers_apps.py) -----------------------------------------------------


def _apps_argv(workdir: Path, uid: int, *args: str) -> list[str]:
    """Copy `realservers_apps.py` into `workdir` (readable by everyone); the command line that
    runs it with `args` as `uid`."""
    script = workdir / "apps.py"
    shutil.copy(APPS, script)
    script.chmod(0o644)
    return as_user([python_for(uid), "-I", "-u", str(script), *args], uid)


@dataclasses.dataclass
class AppServer:
    """A `realservers_apps.py` server: where it listens, its pid and uid, its workers."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    uid: int
    workers: list[int]

    @property
    def pid(self) -> int:
        """The process that listened first (the parent, for the forking servers)."""
        return self.proc.pid

    def pids(self) -> list[int]:
        """The server and every process it forked that is still alive."""
        return [self.pid, *descendants(self.pid)]


@contextlib.contextmanager
def _app_server(bed: Testbed, target: str, port: int, uid: int, cmd: str, *extra: str,
                bind: str | None = None) -> Iterator[AppServer]:
    host = bind or address_of(bed, target)
    workdir = _workdir(cmd)
    try:
        argv = _apps_argv(workdir, uid, cmd, host, str(port), *extra)
        proc = bed.popen(target, argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         cwd=str(workdir), start_new_session=True)
        try:
            line = _read_line(proc, f"{cmd} in {target}", 20)
            workers = [int(p) for p in line.partition("workers=")[2].split(",") if p]
            yield AppServer(proc, host, port, uid, workers)
        finally:
            stop_tree(proc, signal.SIGTERM, 2.0)
            if proc.stdout is not None:
                proc.stdout.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def python_server_as(bed: Testbed, pod: str, port: int, uid: int = NOBODY,
                     bind: str | None = None) -> contextlib.AbstractContextManager[AppServer]:
    """A threaded checking stream server (the demo's protocol) as `uid` in `pod`."""
    return _app_server(bed, pod, port, uid, "serve", bind=bind)


def fork_after_accept_server(bed: Testbed, pod: str, port: int, uid: int = NOBODY,
                             bind: str | None = None
                             ) -> contextlib.AbstractContextManager[AppServer]:
    """Accept, fork, the parent closes its copy at once, the child serves (as `uid`)."""
    return _app_server(bed, pod, port, uid, "fork-serve", bind=bind)


def prefork_server(bed: Testbed, pod: str, port: int, workers: int = 3, uid: int = NOBODY,
                   bind: str | None = None) -> contextlib.AbstractContextManager[AppServer]:
    """Listen, fork `workers` that each accept on the inherited listener (as `uid`);
    `AppServer.workers` are their pids."""
    return _app_server(bed, pod, port, uid, "prefork-serve", str(workers), bind=bind)


class StreamClient:
    """The checking stream client in a pod (`realservers_apps.py send`), watched from outside
    while it runs. With `fork`, it connects, forks, the parent closes its fd and the child
    sends: `app_pid()` is then the child's."""

    def __init__(self, bed: Testbed, target: str, host: str, port: int, *, uid: int = 0,
                 fork: bool = False, mbps: float = 0.0, seconds: float = 120.0) -> None:
        self.what = f"{'forking ' if fork else ''}stream client in {target}"
        self.fork = fork
        self.dir = _workdir("client")
        self.stop_file = self.dir / "stop"
        try:
            argv = _apps_argv(self.dir, uid, "send", host, str(port), str(self.stop_file),
                              "--seconds", str(seconds), "--mbps", str(mbps),
                              *(["--fork"] if fork else []))
            self.proc = bed.popen(target, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=str(self.dir))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self._child: int | None = None

    def app_pid(self) -> int:
        """The process that holds the connection and sends."""
        if not self.fork:
            return self.proc.pid
        if self._child is None:
            self._child = int(json.loads(_read_line(self.proc, self.what, 20))["forked"])
        return self._child

    def peer(self) -> tuple[str, int] | None:
        """Peer of the sending process's TCP socket as its fd sees it now."""
        peers = tcp_peers([self.app_pid()]).get(self.app_pid(), [])
        return peers[0] if peers else None

    def result(self, timeout: float = 60) -> dict[str, Any]:
        """Stop sending; the client's JSON result (with `rc` and `stderr`)."""
        if self.fork:
            self.app_pid()  # its first line is read before the rest
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.close()
        lines = [line for line in out.decode(errors="replace").splitlines() if line.strip()]
        try:
            result = json.loads(lines[-1])
        except (IndexError, ValueError):
            result = {"ok": False}
        result.update(rc=self.proc.returncode, stderr=err.decode(errors="replace")[-1500:])
        return result

    def close(self) -> None:
        """Kill it if it still runs (with a forked child); remove its directory."""
        if self.proc.poll() is None:
            stop_tree(self.proc, signal.SIGKILL, 0)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fork_after_connect_client(bed: Testbed, target: str, host: str, port: int, uid: int = 0,
                              mbps: float = 0.0, seconds: float = 120.0) -> StreamClient:
    """A client that connects, forks; the parent closes its fd, the child does the traffic."""
    return StreamClient(bed, target, host, port, uid=uid, fork=True, mbps=mbps, seconds=seconds)


class HttpGetClient:
    """`realservers_apps.py http-get` in a pod: GET one path again and again on one keep-alive
    connection for `seconds`, checking every body's status, length and SHA-256."""

    def __init__(self, bed: Testbed, target: str, host: str, port: int, path: str, size: int,
                 sha256: str, seconds: float, uid: int = 0) -> None:
        self.dir = _workdir("http-get")
        try:
            argv = _apps_argv(self.dir, uid, "http-get", host, str(port), path, str(size),
                              sha256, str(seconds))
            self.proc = bed.popen(target, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd=str(self.dir))
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def result(self, timeout: float = 60) -> dict[str, Any]:
        """Its JSON result (with `rc` and `stderr`) once it is done."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            self.close()
        try:
            result = json.loads(out.decode().strip().splitlines()[-1])
        except (IndexError, ValueError):
            result = {"requests": 0, "bad": -1}
        result.update(rc=self.proc.returncode, stderr=err.decode(errors="replace")[-1500:])
        return result

    def close(self) -> None:
        """Kill it if it still runs; remove its directory."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> HttpGetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- nginx ----------------------------------------------------------------------------------------

BIG_PATH, SMALL_PATH = "/big.bin", "/small.txt"
BIG_SIZE = 1 << 20

NGINX_CONF = """\
user nobody nogroup;
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 120s;
    keepalive_requests 100000000;
    client_body_temp_path {tmp}/temp/client_body;
    proxy_temp_path {tmp}/temp/proxy;
    fastcgi_temp_path {tmp}/temp/fastcgi;
    uwsgi_temp_path {tmp}/temp/uwsgi;
    scgi_temp_path {tmp}/temp/scgi;
    log_format checked '$connection $connection_requests $status $body_bytes_sent $request_uri';
    {access_log}
    server {{
        listen {host}:{port} backlog=1024;
        root {tmp}/html;
        location / {{ }}
    }}
}}
"""


@dataclasses.dataclass
class NginxServer:
    """A running nginx: its master and worker pids, where it listens, the files it serves
    (URL path -> (size, sha256))."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path
    worker_pids: list[int]
    files: dict[str, tuple[int, str]]
    big_path: str = BIG_PATH
    small_path: str = SMALL_PATH

    @property
    def master_pid(self) -> int:
        """The master (root)."""
        return self.proc.pid

    def url(self, path: str) -> str:
        """The URL of `path` on this server."""
        return f"http://{self.host}:{self.port}{path}"

    def access_log(self) -> list[str]:
        """The access log so far (`$connection $connection_requests $status
        $body_bytes_sent $request_uri`, unbuffered)."""
        path = self.workdir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def check_responses(self) -> dict[str, Any]:
        """Every logged response: complete (200 and the file's whole size), or the last one of
        its connection cut when the client stopped; anything else is `bad`."""
        return check_access_log(self.access_log(), self.files)


def check_access_log(lines: list[str], files: dict[str, tuple[int, str]]) -> dict[str, Any]:
    """Sort nginx access log lines (see `NginxServer.access_log`) into complete responses,
    responses cut at the end of their connection, and bad ones (listed, first 5)."""
    by_conn: dict[str, list[tuple[int, int, int, str]]] = {}
    for line in lines:
        conn, n, status, sent, uri = line.split()[:5]
        by_conn.setdefault(conn, []).append((int(n), int(status), int(sent), uri))
    complete = cut = 0
    bad: list[str] = []
    for conn, reqs in by_conn.items():
        last = max(r[0] for r in reqs)
        for n, status, sent, uri in reqs:
            size = files.get(uri, (-1, ""))[0]
            if status == 200 and sent == size:
                complete += 1
            elif n == last and status in (200, 499) and sent <= size:
                cut += 1  # the request in flight when the client stopped
            else:
                bad.append(f"conn {conn} #{n}: {status} {sent} bytes of {uri}")
    return {"requests": len(lines), "complete": complete, "cut_at_end": cut,
            "bad_count": len(bad), "bad": bad[:5], "connections": len(by_conn)}


@contextlib.contextmanager
def nginx_server(bed: Testbed, pod: str, port: int, bind: str | None = None, workers: int = 2,
                 access_log: bool = True) -> Iterator[NginxServer]:
    """nginx in `pod` on its IP: master as root, `workers` workers as nobody/nogroup, serving
    a 1 MiB file (`BIG_PATH`) and a small one (`SMALL_PATH`) with sendfile and keep-alive.
    `access_log=False` for benchmarks (no per-request write)."""
    host = bind or address_of(bed, pod)
    tmp = _workdir("nginx")
    try:
        html = tmp / "html"
        html.mkdir(mode=0o755)
        (tmp / "temp").mkdir(mode=0o755)
        big = hashlib.shake_256(f"nginx {port}".encode()).digest(BIG_SIZE)
        small = b"ebpf-router real servers: a small response body\n" * 8
        files = {}
        for path, body in ((BIG_PATH, big), (SMALL_PATH, small)):
            (html / path.lstrip("/")).write_bytes(body)
            (html / path.lstrip("/")).chmod(0o644)
            files[path] = (len(body), hashlib.sha256(body).hexdigest())
        log_line = f"access_log {tmp}/access.log checked;" if access_log else "access_log off;"
        (tmp / "nginx.conf").write_text(NGINX_CONF.format(workers=workers, tmp=tmp, host=host,
                                                          port=port, access_log=log_line))
        err_log = tmp / "error.log"
        proc = bed.popen(pod, ["nginx", "-p", f"{tmp}/", "-c", str(tmp / "nginx.conf"),
                               "-e", str(err_log)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(tmp),
                         start_new_session=True)
        try:
            _wait_listening(bed, pod, host, port, proc, f"nginx in {pod}", err_log)
            deadline = time.monotonic() + 10
            while len(pids := [p for p in descendants(proc.pid) if uid_of(p) == NOBODY]) \
                    < workers:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RealServerError(f"nginx in {pod}: {len(pids)} of {workers} workers "
                                          f"as nobody{_tail(err_log)}")
                time.sleep(0.05)
            yield NginxServer(proc, host, port, tmp, pids, files)
        finally:
            stop_tree(proc, signal.SIGTERM, 5.0)  # SIGTERM: nginx's fast shutdown
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


WRK_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def wrk_argv(url: str, seconds: float, connections: int = 16, threads: int = 2) -> list[str]:
    """wrk with keep-alive connections held for the whole run (its default)."""
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--timeout", "10s", url]


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests, seconds, requests/s, bytes read, non-2xx/3xx responses and socket errors
    from wrk's report (wrk prints the error lines only when there were errors)."""
    res: dict[str, Any] = {"requests": 0, "seconds": 0.0, "rps": 0.0, "read_bytes": 0,
                           "non_2xx_3xx": 0, "socket_errors": {}, "parsed": False}
    m = re.search(r"(\d+) requests in ([\d.]+)(m?s|m|h), ([\d.]+)([KMGT]?B) read", out)
    if m:
        scale = {"s": 1, "ms": 1e-3, "m": 60, "h": 3600}[m.group(3)]
        res.update(requests=int(m.group(1)), seconds=float(m.group(2)) * scale,
                   read_bytes=int(float(m.group(4)) * WRK_UNITS[m.group(5)]), parsed=True)
    if m := re.search(r"Requests/sec:\s+([\d.]+)", out):
        res["rps"] = float(m.group(1))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        res["non_2xx_3xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      out):
        res["socket_errors"] = {k: int(v) for k, v in zip(("connect", "read", "write",
                                                           "timeout"), m.groups(), strict=True)
                                if int(v)}
    return res


# -- PostgreSQL -----------------------------------------------------------------------------------


@dataclasses.dataclass
class PgServer:
    """A running PostgreSQL: connection parameters and its postmaster."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    workdir: Path
    user: str = "postgres"
    dbname: str = "postgres"
    scale: int = 1

    @property
    def postmaster_pid(self) -> int:
        """The postmaster (it accepts; each backend is a forked child)."""
        return self.proc.pid

    @property
    def params(self) -> dict[str, Any]:
        """libpq connection parameters."""
        return {"host": self.host, "port": self.port, "user": self.user, "dbname": self.dbname}

    def backends(self) -> list[int]:
        """Every live child of the postmaster (backends and auxiliary processes)."""
        return descendants(self.postmaster_pid)

    def pgbench_argv(self, *args: str) -> list[str]:
        """`pgbench ARGS` against this server."""
        return [pg_bin("pgbench"), "-h", self.host, "-p", str(self.port), "-U", self.user,
                *args, self.dbname]

    def psql_argv(self, sql: str) -> list[str]:
        """`psql -c SQL` against this server, unaligned tuples only, stop on error."""
        return [pg_bin("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", self.host,
                "-p", str(self.port), "-U", self.user, "-d", self.dbname, "-c", sql]


PG_HBA = "local all all trust\nhost all all 0.0.0.0/0 trust\n"


@contextlib.contextmanager
def postgres_server(bed: Testbed, pod: str, port: int, bind: str | None = None,
                    scale: int = 1, init_from: str | None = None) -> Iterator[PgServer]:
    """PostgreSQL as the `postgres` user in `pod` on its IP: a fresh cluster (initdb, trust for
    every IPv4 client, fsync off, unix socket in its own directory), initialized with
    `pgbench -i -s SCALE` from `init_from` (default: a pod on another node)."""
    host = bind or address_of(bed, pod)
    pw = pwd.getpwnam("postgres")
    tmp = _workdir("pg", owner=pw.pw_uid)
    try:
        data, sock_dir = tmp / "data", tmp / "sock"
        sock_dir.mkdir(mode=0o700)
        os.chown(sock_dir, pw.pw_uid, pw.pw_gid)
        res = subprocess.run(as_user([pg_bin("initdb"), "-D", str(data), "-U", "postgres",
                                      "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                                     pw.pw_uid, pw.pw_gid),
                             cwd=str(tmp), capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RealServerError(f"initdb in {tmp}: {res.stdout[-800:]}{res.stderr[-800:]}")
        (data / "pg_hba.conf").write_text(PG_HBA)
        log = tmp / "postgres.log"
        argv = [pg_bin("postgres"), "-D", str(data), "-c", f"listen_addresses={host}",
                "-c", f"port={port}", "-c", f"unix_socket_directories={sock_dir}",
                "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=40", "-c", "shared_buffers=64MB",
                "-c", "logging_collector=off", "-c", "log_destination=stderr"]
        with open(log, "wb") as out:
            proc = bed.popen(pod, as_user(argv, pw.pw_uid, pw.pw_gid), stdout=out,
                             stderr=subprocess.STDOUT, cwd=str(tmp), start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while "ready to accept connections" not in log.read_text(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RealServerError(f"postgres in {pod} did not start{_tail(log)}")
                time.sleep(0.05)
            _wait_listening(bed, pod, host, port, proc, f"postgres in {pod}", log)
            server = PgServer(proc, host, port, tmp, scale=scale)
            client = init_from or other_side(bed, pod)
            res = bed.run(client, server.pgbench_argv("-i", "-q", "-s", str(scale)), timeout=300)
            if res.returncode != 0:
                raise RealServerError(f"pgbench -i from {client}: {res.stderr[-800:]}")
            yield server
        finally:
            stop_tree(proc, signal.SIGINT, 15.0)  # SIGINT: PostgreSQL's fast shutdown
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_pgbench(out: str) -> dict[str, Any]:
    """tps, transactions processed and failed, average latency (ms) from pgbench's report."""
    res: dict[str, Any] = {"tps": 0.0, "processed": 0, "failed": 0, "latency_ms": None,
                           "parsed": False}
    if m := re.search(r"number of transactions actually processed: (\d+)", out):
        res["processed"] = int(m.group(1))
        res["parsed"] = True
    if m := re.search(r"number of failed transactions: (\d+)", out):
        res["failed"] = int(m.group(1))
    if m := re.search(r"tps = ([\d.]+)", out):
        res["tps"] = float(m.group(1))
    if m := re.search(r"latency average = ([\d.]+) ms", out):
        res["latency_ms"] = float(m.group(1))
    return res


PG_SUMS = ("select (select sum(abalance) from pgbench_accounts), "
           "(select sum(bbalance) from pgbench_branches), "
           "(select sum(tbalance) from pgbench_tellers), "
           "(select coalesce(sum(delta), 0) from pgbench_history), "
           "(select count(*) from pgbench_history)")


def pgbench_invariants(bed: Testbed, target: str, server: PgServer) -> dict[str, Any]:
    """TPC-B's invariants read from `target`: every transaction added the same delta to one
    account, teller and branch and one history row, so the four sums agree."""
    res = bed.run(target, server.psql_argv(PG_SUMS), timeout=60)
    if res.returncode != 0:
        raise RealServerError(f"psql from {target}: {res.stderr[-800:]}")
    accounts, branches, tellers, history, rows = (int(x or 0) for x in
                                                   res.stdout.strip().split("|"))
    return {"accounts": accounts, "branches": branches, "tellers": tellers, "history": history,
            "history_rows": rows, "ok": accounts == branches == tellers == history}
