"""`ebpf-router doctor`: what this node has and lacks for the router, each item really tried.

Every check looks at the running kernel and this process: BTF is parsed and the fields the
tracer reads are resolved; the tracepoints' format files are read; tiny BPF programs are
loaded (never attached or run); `pidfd_getfd` copies one of this process's own sockets; a
file system that is not mounted is mounted in a throw-away mount namespace to see whether it
could be. Nothing on the node is changed.

Each check has a need: *required* (the daemon cannot run without it), *optional* (a feature
needs it; today's daemon runs without), or *not needed*; and a verdict: ok, missing
(required and absent), lacking (optional and absent), unknown (could not be read), info. The
overall verdict fails, and the exit code is 1, only when something required is missing.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import platform
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from .privileges import CAP_NUMBERS, CAPABILITIES

OK, FAIL, WARN, UNKNOWN, INFO = "ok", "missing", "lacking", "unknown", "info"
REQUIRED, OPTIONAL, NOT_NEEDED = "required", "optional", "not needed"

BTF_PATH = "/sys/kernel/btf/vmlinux"
TRACEFS_PATH = "/sys/kernel/tracing"
BPFFS_PATH = "/sys/fs/bpf"
CGROUP2_PATH = "/sys/fs/cgroup"
SECURITYFS_PATH = "/sys/kernel/security"
KPROBE_PMU = "/sys/bus/event_source/devices/kprobe"

_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, and whether it is enough."""

    name: str
    verdict: str  # ok, missing (required, absent), lacking (optional, absent), unknown, info
    need: str  # required, optional, not needed
    detail: str


@dataclasses.dataclass
class DoctorOptions:
    """Where each check looks; the defaults are the node's real paths."""

    btf_path: str = BTF_PATH
    tracefs_path: str | None = None  # None: wherever tracefs is mounted (or mountable)
    bpffs_path: str = BPFFS_PATH
    lockdown_path: str | None = None  # None: securityfs's lockdown file (mounted or not)
    kprobe_pmu: str = KPROBE_PMU
    mounts_path: str = "/proc/self/mounts"
    overlay_if: str | None = None
    host_if: str | None = None


def _check(name: str, need: str, ok: bool, detail: str) -> Check:
    absent = {REQUIRED: FAIL, OPTIONAL: WARN, NOT_NEEDED: INFO}[need]
    return Check(name, OK if ok else absent, need, detail)


# ------------------------------------------------------------------------- mounts


def _mounts(path: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount in `path` (/proc/self/mounts)."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((parts[1].replace("\\040", " "), parts[2]))
    return out


def _mounted(opts: DoctorOptions, fstype: str) -> list[str]:
    return [mnt for mnt, kind in _mounts(opts.mounts_path) if kind == fstype]


def _known_filesystems() -> set[str]:
    with open("/proc/filesystems") as f:
        return {line.split()[-1] for line in f if line.strip()}


def in_private_mount(fstype: str, probe: Callable[[str], Any]) -> Any:
    """Mount `fstype` on a fresh temporary directory in a new, private mount namespace (in a
    child process), run `probe(mount_point)` there and return its JSON-able result. The
    node's mounts stay as they are; the directory is removed.

    Raises OSError naming the step that failed (unshare, mount).
    """
    target = tempfile.mkdtemp(prefix=f"er-doctor-{fstype}-")
    try:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.close(read)
                try:
                    answer: dict[str, Any] = {"ok": True,
                                              "result": _probe_mounted(fstype, target, probe)}
                except OSError as exc:
                    answer = {"ok": False, "errno": exc.errno or 0, "error": exc.strerror}
                os.write(write, json.dumps(answer).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        with os.fdopen(read, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
    finally:
        os.rmdir(target)
    if not data:
        raise OSError(0, f"probing {fstype}: the child process died")
    answer = json.loads(data)
    if not answer["ok"]:
        raise OSError(answer["errno"], answer["error"])
    return answer["result"]


def _probe_mounted(fstype: str, target: str, probe: Callable[[str], Any]) -> Any:
    """In the child: a private mount namespace, `fstype` mounted at `target`, `probe` run."""

    def fail(step: str) -> OSError:
        err = ctypes.get_errno()
        return OSError(err, f"{step}: {os.strerror(err)}")

    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise fail("unshare(CLONE_NEWNS)")
    if _libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise fail("mount --make-rprivate /")
    if _libc.mount(b"none", target.encode(), fstype.encode(), 0, None) != 0:
        raise fail(f"mount -t {fstype}")
    return probe(target)


def _file_system(opts: DoctorOptions, name: str, fstype: str, default: str, need: str,
                 purpose: str) -> Check:
    found = _mounted(opts, fstype)
    if found:
        where = default if default in found else found[0]
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        return _check(name, need, True, f"mounted at {where}{more}")
    if fstype not in _known_filesystems():
        return _check(name, need, False, f"the kernel has no {fstype} file system; {purpose}")
    try:
        in_private_mount(fstype, lambda _: None)
    except OSError as exc:
        return _check(name, need, False, f"not mounted, and mounting it failed ({exc}); "
                                         f"{purpose}")
    return _check(name, need, True, f"not mounted at {default}, but mountable (tried in a "
                                    "private mount namespace)")


# ------------------------------------------------------------------------- checks


def check_kernel() -> Check:
    """The running kernel and architecture (information)."""
    u = platform.uname()
    return Check("kernel", INFO, NOT_NEEDED, f"Linux {u.release} {u.machine}")


def check_btf(opts: DoctorOptions) -> Check:
    """BTF is readable and has every struct field the tracer's programs read."""
    from bpf_asm.btf import BTF, BTFError

    from .tracer_layout import KernelLayout

    try:
        btf = BTF.load(opts.btf_path)
        layout = KernelLayout.from_btf(btf)
    except (BTFError, OSError, ValueError) as exc:
        return _check("btf", REQUIRED, False, f"{exc} (struct offsets come from BTF: the kernel "
                                              "needs CONFIG_DEBUG_INFO_BTF=y)")
    fields = [f for f in dataclasses.fields(layout) if f.name != "pointer_size"]
    found = sum(getattr(layout, f.name) is not None for f in fields)
    return _check("btf", REQUIRED, True, f"{opts.btf_path}: {found} of {len(fields)} struct "
                                         "fields the tracer reads found")


def check_tracefs(opts: DoctorOptions) -> Check:
    """tracefs is mounted, or could be (the daemon mounts it at start)."""
    if opts.tracefs_path is not None:
        ok = os.path.isdir(os.path.join(opts.tracefs_path, "events"))
        return _check("tracefs", REQUIRED, ok, f"{opts.tracefs_path}" +
                      ("" if ok else ": no events/ directory there"))
    return _file_system(opts, "tracefs", "tracefs", TRACEFS_PATH, REQUIRED,
                        "tracepoints are attached through it")


def _read_tracepoints(root: str) -> dict[str, Any]:
    """Which of the tracer's tracepoints `root/events` has, and whether their formats carry
    the arguments the programs read."""
    from bpf_asm.tracefs import parse_format

    from .tracer_layout import TracepointArgs
    from .tracer_programs import TRACEPOINTS

    formats, missing = {}, []
    for _, category, name in TRACEPOINTS:
        try:
            with open(os.path.join(root, "events", category, name, "format")) as f:
                formats[f"{category}:{name}"] = parse_format(f.read(), category, name)
        except OSError:
            missing.append(f"{category}:{name}")
    args_error = None
    if not missing:
        try:
            TracepointArgs.from_tracefs(formats)
        except (KeyError, ValueError) as exc:
            args_error = f"a format lacks an argument the programs read: {exc}"
    return {"found": len(formats), "total": len(TRACEPOINTS), "missing": missing,
            "args_error": args_error}


def check_tracepoints(opts: DoctorOptions) -> Check:
    """Every syscall and sched tracepoint the tracer attaches to exists, with its arguments."""
    root = opts.tracefs_path
    if root is None:
        mounted = _mounted(opts, "tracefs")
        root = TRACEFS_PATH if TRACEFS_PATH in mounted else (mounted[0] if mounted else None)
    try:
        if root is not None:
            seen = _read_tracepoints(root)
        else:
            seen = in_private_mount("tracefs", _read_tracepoints)
    except OSError as exc:
        return _check("tracepoints", REQUIRED, False, f"cannot read tracefs: {exc}")
    if seen["missing"]:
        return _check("tracepoints", REQUIRED, False,
                      f"{seen['found']} of {seen['total']} found; missing "
                      f"{', '.join(seen['missing'])} (the kernel needs CONFIG_FTRACE_SYSCALLS)")
    if seen["args_error"]:
        return _check("tracepoints", REQUIRED, False, seen["args_error"])
    return _check("tracepoints", REQUIRED, True, f"all {seen['total']} (syscalls:sys_enter/"
                                                 "exit of listen, accept, accept4, connect, "
                                                 "close; sched process exit, fork, exec)")


def check_bpffs(opts: DoctorOptions) -> Check:
    """bpffs, for pinned maps; today's tracer pins nothing."""
    if opts.bpffs_path != BPFFS_PATH:
        ok = (opts.bpffs_path, "bpf") in _mounts(opts.mounts_path)
        return _check("bpffs", OPTIONAL, ok, f"{opts.bpffs_path}" +
                      ("" if ok else ": not a bpf mount"))
    return _file_system(opts, "bpffs", "bpf", BPFFS_PATH, OPTIONAL,
                        "only pinned maps need it; the tracer pins nothing")


def check_cgroup2(opts: DoctorOptions) -> Check:
    """cgroup v2, where cgroup sock_addr programs attach (not used by today's daemon)."""
    found = _mounted(opts, "cgroup2")
    hybrid = bool(_mounted(opts, "cgroup"))
    if found:
        mode = "hybrid: v1 controllers too" if hybrid else "unified"
        return _check("cgroup2", OPTIONAL, True, f"mounted at {found[0]} ({mode})")
    return _file_system(opts, "cgroup2", "cgroup2", CGROUP2_PATH, OPTIONAL,
                        "cgroup sock_addr hooks attach to a cgroup v2 directory")


def check_pidfd_getfd() -> Check:
    """pidfd_getfd(2) works: copy one of this process's own sockets and compare inodes."""
    from injector.errors import InjectorError
    from injector.inspect import getfd

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            new = getfd(os.getpid(), sock.fileno())
        except (InjectorError, OSError) as exc:
            return _check("pidfd_getfd", REQUIRED, False,
                          f"{exc} (Linux 5.6+; the daemon copies apps' sockets with it)")
        try:
            same = os.fstat(new).st_ino == os.fstat(sock.fileno()).st_ino
        finally:
            os.close(new)
    return _check("pidfd_getfd", REQUIRED, same, "copied a socket of this process" +
                  ("" if same else ", but the copy is another file"))


def check_kprobes(opts: DoctorOptions) -> Check:
    """kprobes: reported, never needed (the router hooks syscall tracepoints only)."""
    found = os.path.isdir(opts.kprobe_pmu)
    if not found:
        root = opts.tracefs_path or next(iter(_mounted(opts, "tracefs")), None)
        found = root is not None and os.path.exists(os.path.join(root, "kprobe_events"))
    if found:
        return Check("kprobes", INFO, NOT_NEEDED, "present (unused: the router attaches to "
                                                  "syscall tracepoints only)")
    return Check("kprobes", INFO, NOT_NEEDED, "absent (CONFIG_KPROBES off); this costs "
                                              "nothing: the router attaches to syscall "
                                              "tracepoints only")


def _lockdown_mode(path: str) -> str:
    with open(path) as f:
        words = f.read().split()
    chosen = [w.strip("[]") for w in words if w.startswith("[")]
    if not chosen:
        raise ValueError(f"{path}: no [selected] mode in {' '.join(words)!r}")
    return chosen[0]


def check_lockdown(opts: DoctorOptions) -> Check:
    """Kernel lockdown: 'confidentiality' forbids the kernel reads the tracer does."""
    path = opts.lockdown_path
    try:
        if path is not None:
            mode = _lockdown_mode(path)
            where = path
        elif SECURITYFS_PATH in _mounted(opts, "securityfs"):
            where = os.path.join(SECURITYFS_PATH, "lockdown")
            if not os.path.exists(where):
                return _check("lockdown", REQUIRED, True, "no lockdown LSM (securityfs has no "
                                                          "lockdown file): not restricted")
            mode = _lockdown_mode(where)
        else:
            where = f"{SECURITYFS_PATH}/lockdown (securityfs mounted privately)"
            found = in_private_mount("securityfs", lambda root: (
                _lockdown_mode(os.path.join(root, "lockdown"))
                if os.path.exists(os.path.join(root, "lockdown")) else None))
            if found is None:
                return _check("lockdown", REQUIRED, True, "no lockdown LSM (securityfs has no "
                                                          "lockdown file): not restricted")
            mode = found
    except (OSError, ValueError) as exc:
        return Check("lockdown", UNKNOWN, REQUIRED, f"cannot read the lockdown mode: {exc} "
                                                    "(in confidentiality mode the tracer "
                                                    "cannot run)")
    if mode == "confidentiality":
        return _check("lockdown", REQUIRED, False, f"{where}: confidentiality: BPF programs "
                                                   "may not read kernel memory (the tracer "
                                                   "must); boot with lockdown=integrity or none")
    return _check("lockdown", REQUIRED, True, f"{where}: {mode}")


def effective_capabilities() -> set[str]:
    """This process's effective capabilities (names), from /proc/self/status."""
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("CapEff:"))
    mask = int(line.split()[1], 16)
    return {name for name, bit in CAP_NUMBERS.items() if mask >> bit & 1}


# bpf_capable() and perfmon_capable() in the kernel accept CAP_SYS_ADMIN instead.
_STANDS_IN = {"CAP_BPF": "CAP_SYS_ADMIN", "CAP_PERFMON": "CAP_SYS_ADMIN"}


def check_capabilities(held: set[str] | None = None) -> Check:
    """The process holds every capability of `privileges.CAPABILITIES` (or the kernel's
    stand-in for it)."""
    held = effective_capabilities() if held is None else held
    absent = [name for name in CAPABILITIES if name not in held]
    covered = [name for name in absent if _STANDS_IN.get(name) in held]
    missing = [name for name in absent if name not in covered]
    also = "".join(f"; {name} not held, {_STANDS_IN[name]} stands in for it (the kernel "
                   "accepts either)" for name in covered)
    if missing:
        why = "; ".join(f"{name}: {CAPABILITIES[name][1]}" for name in missing)
        return _check("capabilities", REQUIRED, False,
                      f"missing {', '.join(missing)} ({why}){also}")
    return _check("capabilities", REQUIRED, True,
                  f"all {len(CAPABILITIES)} the daemon uses ({', '.join(CAPABILITIES)})" if not
                  covered else f"{len(CAPABILITIES) - len(covered)} of {len(CAPABILITIES)} "
                               f"held{also}")


def _try_load(what: str, build: Callable[[], Any]) -> str | None:
    """Load a program (closed at once); None if the kernel took it, else why not."""
    from bpf_asm.syscall import BPFError

    try:
        build().close()
    except (BPFError, OSError, ValueError) as exc:
        return f"{what}: {exc}"
    return None


def check_send_signal() -> Check:
    """A tracepoint program that calls bpf_send_signal loads (it is never attached or run)."""
    from bpf_asm.builder import Builder
    from bpf_asm.isa import R0, R1
    from bpf_asm.programs import load_program

    def build() -> Any:
        b = Builder()
        b.mov64(R1, 10)  # SIGUSR1, if it ever ran
        b.call("send_signal")
        b.mov64(R0, 0)
        b.exit()
        return load_program(b.build(), "tracepoint", name="er_doctor_sig")

    error = _try_load("tracepoint program calling bpf_send_signal", build)
    return _check("bpf_send_signal", OPTIONAL, error is None, error or
                  "a tracepoint program may call it (loaded, not run): the kernel can signal "
                  "(stop) an app itself, for swaps at connect()/accept() return")


def check_sock_addr_hooks() -> Check:
    """cgroup sock_addr programs for getpeername/getsockname (IPv4 and IPv6) load."""
    from bpf_asm.builder import Builder
    from bpf_asm.isa import R0
    from bpf_asm.programs import load_program

    errors = []
    hooks = ("cgroup_inet4_getpeername", "cgroup_inet6_getpeername",
             "cgroup_inet4_getsockname", "cgroup_inet6_getsockname")
    for hook in hooks:
        def build(hook: str = hook) -> Any:
            b = Builder()
            b.mov64(R0, 1)  # these hooks must return 1
            b.exit()
            return load_program(b.build(), "cgroup_sock_addr", name="er_doctor_addr",
                                attach_type=hook)

        error = _try_load(hook, build)
        if error:
            errors.append(error)
    if errors:
        return _check("sock_addr_hooks", OPTIONAL, False, "; ".join(errors) +
                      " (Linux 5.8+; they would keep apps seeing overlay addresses after a swap)")
    return _check("sock_addr_hooks", OPTIONAL, True, "getpeername and getsockname, IPv4 and "
                                                     "IPv6: programs load (not attached)")


def check_interface(role: str, name: str | None) -> Check:
    """The overlay or host interface as `run` would be given it: exists, up, addresses."""
    from pyroute2 import IPRoute

    check = f"{role}_if"
    flag = f"--{role}-if / {role.upper()}_IF"
    if not name:
        return Check(check, INFO, REQUIRED, f"not given ({flag}); checked when given")
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return _check(check, REQUIRED, False, f"interface {name!r} does not exist "
                                                  "in this network namespace")
        link = ipr.get_links(found[0])[0]
        state = link.get_attr("IFLA_OPERSTATE") or "?"
        up = bool(link["flags"] & 1)  # IFF_UP
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        addrs = [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr(index=found[0])
                 if a.get_attr("IFA_ADDRESS")]
    facts = [f"{name}: {kind or 'device'}", f"{'up' if up else 'down'} ({state.lower()})",
             f"mtu {link.get_attr('IFLA_MTU')}",
             f"addresses {', '.join(addrs)}" if addrs else "no address"]
    ok = up and bool(addrs)
    if role == "overlay":
        from .hostnet import HostNetError, overlay_peers

        try:
            peers = overlay_peers(name)
        except (HostNetError, OSError) as exc:
            peers, ok = {}, False
            facts.append(f"routes unreadable: {exc}")
        facts.append(f"routes to {len(peers)} peer node(s)" + (
            ": " + ", ".join(f"{net} via {host}" for net, host in sorted(
                peers.items(), key=lambda p: str(p[0]))) if peers else
            " (peers then come from Kubernetes Nodes or --peer)"))
    return _check(check, REQUIRED, ok, "; ".join(facts))


# ------------------------------------------------------------------------- report


def run_checks(opts: DoctorOptions, held: set[str] | None = None) -> list[Check]:
    """Every check, in report order."""
    return [
        check_kernel(),
        check_btf(opts),
        check_tracefs(opts),
        check_tracepoints(opts),
        check_bpffs(opts),
        check_cgroup2(opts),
        check_pidfd_getfd(),
        check_kprobes(opts),
        check_lockdown(opts),
        check_capabilities(held),
        check_send_signal(),
        check_sock_addr_hooks(),
        check_interface("overlay", opts.overlay_if),
        check_interface("host", opts.host_if),
    ]


def overall(checks: Sequence[Check]) -> tuple[bool, str]:
    """(ready, one-line verdict): ready unless a required item is missing."""
    missing = [c.name for c in checks if c.verdict == FAIL]
    lacking = [c.name for c in checks if c.verdict == WARN]
    unknown = [c.name for c in checks if c.verdict == UNKNOWN]
    notes = "; ".join(part for part in (
        f"optional, lacking: {', '.join(lacking)}" if lacking else "",
        f"could not tell: {', '.join(unknown)}" if unknown else "") if part)
    if missing:
        return False, f"NOT READY: missing {', '.join(missing)}" + (f" ({notes})" if notes
                                                                    else "")
    if notes:
        return True, f"READY: the router can run here ({notes})"
    return True, "READY: the router can run here"


def format_report(checks: Sequence[Check]) -> str:
    """One line per check, then the verdict."""
    width = max(len(c.name) for c in checks)
    lines = [f"{c.verdict.upper():<8} {c.name:<{width}}  {c.need:<10}  {c.detail}"
             for c in checks]
    lines.append(overall(checks)[1])
    return "\n".join(lines)


def add_doctor_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `doctor` to the CLI (handler in `args.func`)."""
    p = subparsers.add_parser("doctor", help="check what this node has and lacks for the router")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--overlay-if", dest="overlay_if",
                   help="overlay interface to check (default: OVERLAY_IF)")
    p.add_argument("--host-if", dest="host_if", help="host interface to check (HOST_IF)")
    p.add_argument("--btf", default=BTF_PATH, help=f"BTF file ({BTF_PATH})")
    p.add_argument("--tracefs", default=None, help="tracefs root (default: where it is mounted)")
    p.add_argument("--lockdown", default=None,
                   help="lockdown file (default: securityfs's, mounted privately if need be)")
    p.set_defaults(func=run_doctor)
    return p


def run_doctor(args: argparse.Namespace) -> int:
    """Run the checks for parsed `args`; print the report; 0 if ready, 1 if not."""
    opts = DoctorOptions(btf_path=args.btf, tracefs_path=args.tracefs,
                         lockdown_path=args.lockdown,
                         overlay_if=args.overlay_if or os.environ.get("OVERLAY_IF") or None,
                         host_if=args.host_if or os.environ.get("HOST_IF") or None)
    checks = run_checks(opts)
    ready, verdict = overall(checks)
    if args.json:
        print(json.dumps({"ready": ready, "verdict": verdict,
                          "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        print(format_report(checks))
    return 0 if ready else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m ebpfrouter.doctor`."""
    parser = argparse.ArgumentParser(prog="ebpf-router")
    add_doctor_parser(parser.add_subparsers(dest="command"))
    return int(run_doctor(parser.parse_args(["doctor", *(sys.argv[1:] if argv is None
                                                          else argv)])))


if __name__ == "__main__":
    sys.exit(main())

