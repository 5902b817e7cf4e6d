"""Least privilege: after start-up the daemon keeps only the capabilities it still uses.

`drop_privileges(keep)` reduces, for the calling thread and every thread or process it creates
afterwards, the bounding, effective, permitted, inheritable and ambient capability sets to
`keep`, and sets `PR_SET_NO_NEW_PRIVS` (no exec can gain privileges back, setuid binaries and
file capabilities included). It uses `capget`/`capset`/`prctl` through ctypes.

Reducing the bounding set needs CAP_SETPCAP, which the Helm chart does not add (a container
whose bounding set is the chart's list has nothing else in it anyway). Without it the bounding
set is left as it is and reported in `bounding_kept`: those capabilities are out of reach all
the same, since they are no longer permitted (capset cannot add them back) and no_new_privs
caps what any execve, even a root one, may be granted at the permitted set it had.

Capabilities are a per-thread attribute in Linux: call it while the daemon has one thread
(before any executor or watcher thread starts); threads created later inherit the reduced
sets. `DroppedReport.other_threads` names any thread that still holds more.

What each daemon operation needs (kernel 5.8+; each line is checked by
`tests/ebpfrouter/test_privileges.py` both ways, on the running kernel):

    load a BPF program / create a map     CAP_BPF (+ CAP_PERFMON for tracing programs)
    attach a tracepoint (perf_event_open)  CAP_PERFMON
    use maps, ring/perf buffers, links     nothing: the fds carry the right
    ptrace-seize another process           CAP_SYS_PTRACE (unless same uid *and* the target's
    pidfd_getfd, /proc/PID/ns                capabilities are a subset of ours: after a drop,
                                              any root process with more caps needs it)
    list /proc/PID/fd, read /proc/PID/fd/N CAP_DAC_READ_SEARCH + CAP_SYS_PTRACE for a process
    and /proc/PID/fdinfo/N of another uid    of another uid: those directories are mode 0500,
                                              owned by the process's euid, and their permission
                                              hook asks generic_permission() (DAC) before the
                                              ptrace check; only CAP_DAC_READ_SEARCH or
                                              CAP_DAC_OVERRIDE passes the DAC part
    read/write a frozen process's memory   CAP_SYS_PTRACE only: the injector uses
    (any uid)                                process_vm_readv/writev, never /proc/PID/mem (whose
                                              read-write open would need CAP_DAC_OVERRIDE)
    setns into a pod's network namespace   CAP_SYS_ADMIN
    bind a host listener below port 1024   CAP_NET_BIND_SERVICE (the overlay port is reused)
    SIGCONT a stopped app of another uid   CAP_KILL (the eager swap's resume; uid 0 may
                                              signal only its own uid's processes without it)

So once the tracer is open the daemon keeps CAP_SYS_PTRACE, CAP_SYS_ADMIN,
CAP_DAC_READ_SEARCH, CAP_NET_BIND_SERVICE and CAP_KILL; CAP_BPF and CAP_PERFMON only while it
may still load or attach programs. `CAPABILITIES` below is the one list: the daemon keeps
what it names for after start-up, and the Helm chart adds exactly its names (a chart test checks
`securityContext.capabilities` against `chart_capabilities()`).

CAP_DAC_READ_SEARCH, not CAP_DAC_OVERRIDE: the router only reads and searches (listing fds,
reading fdinfo for flags and epoll registrations); it never writes another user's files. Its
marginal power is small next to CAP_SYS_PTRACE over every process (which already reads any
process's memory), but it is not nothing: it lets the daemon read any file on the node and
call open_by_handle_at(2). CAP_NET_ADMIN is not kept: a socket with a non-zero SO_MARK
cannot be swapped after the drop (the replacement's mark cannot be set); it is refused, not
half done.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading

CAP_NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
CAP_NUMBERS = {name: i for i, name in enumerate(CAP_NAMES)}

# Every capability the router holds, with the calls that need it; "start-up" ones are
# dropped once the BPF programs are attached, the rest are kept (see `daemon_required`).
CAPABILITIES: dict[str, tuple[str, str]] = {
    "CAP_BPF": ("start-up", "bpf(2): load the tracer programs, create its maps"),
    "CAP_PERFMON": ("start-up", "perf_event_open(2): attach programs to tracepoints; "
                                "tracing programs' helpers"),
    "CAP_SYS_PTRACE": ("kept", "PTRACE_SEIZE/INTERRUPT (freeze, syscalls inside the app), "
                               "pidfd_getfd(2) (socket copies), /proc/PID/ns/net and the "
                               "ptrace check of /proc/PID/fd and /proc/PID/fdinfo"),
    "CAP_DAC_READ_SEARCH": ("kept", "list /proc/PID/fd, read /proc/PID/fd/N and "
                                    "/proc/PID/fdinfo/N of processes of another uid (mode 0500)"),
    "CAP_SYS_ADMIN": ("kept", "setns(2) into a pod's network namespace (the hand-off socket, "
                              "the pod's addresses)"),
    "CAP_NET_BIND_SERVICE": ("kept", "bind a host listener on the overlay port when it is "
                                     "below 1024"),
    "CAP_KILL": ("kept", "kill(2) SIGCONT: resume an app of another uid that the tracer "
                         "stopped at connect()/accept() return for the eager swap"),
}

# Which capability each operation of the daemon needs (see the module docstring).
OPERATION_CAPS: dict[str, frozenset[str]] = {
    "bpf_load_tracing_program": frozenset({"CAP_BPF", "CAP_PERFMON"}),
    "bpf_create_map": frozenset({"CAP_BPF"}),
    "bpf_use_open_map": frozenset(),
    "perf_event_open_tracepoint": frozenset({"CAP_PERFMON"}),
    "ptrace_seize_other_process": frozenset({"CAP_SYS_PTRACE"}),
    "pidfd_getfd": frozenset({"CAP_SYS_PTRACE"}),
    "read_proc_fd_other_uid": frozenset({"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}),
    "inject_other_uid": frozenset({"CAP_SYS_PTRACE"}),
    "setns_network": frozenset({"CAP_SYS_ADMIN"}),
    "bind_port_below_1024": frozenset({"CAP_NET_BIND_SERVICE"}),
    "sigcont_other_uid": frozenset({"CAP_KILL"}),
}

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class PrivilegeError(OSError):
    """A capability operation failed; the message names the operation and the capability."""


@dataclasses.dataclass(frozen=True)
class CapSets:
    """The calling thread's capability sets, as sets of names."""

    effective: frozenset[str]
    permitted: frozenset[str]
    inheritable: frozenset[str]
    bounding: frozenset[str]


@dataclasses.dataclass(frozen=True)
class DroppedReport:
    """What `drop_privileges` did."""

    kept: tuple[str, ...]  # held before and kept
    dropped: tuple[str, ...]  # removed from the permitted set
    bounding_dropped: tuple[str, ...]  # removed from the bounding set
    missing: tuple[str, ...]  # asked to keep but not held in the first place
    no_new_privs: bool
    other_threads: tuple[int, ...]  # tids of this process still holding more than `kept`
    bounding_kept: tuple[str, ...] = ()  # left in the bounding set: no CAP_SETPCAP to drop them


def last_cap() -> int:
    """The highest capability number the running kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return len(CAP_NAMES) - 1


def _known() -> list[str]:
    return [name for name in CAP_NAMES if CAP_NUMBERS[name] <= last_cap()]


def _mask(names: set[str] | frozenset[str]) -> int:
    return sum(1 << CAP_NUMBERS[n] for n in names)


def _names(mask: int) -> frozenset[str]:
    return frozenset(name for name in _known() if mask >> CAP_NUMBERS[name] & 1)


def _check_names(names: set[str] | frozenset[str]) -> None:
    unknown = sorted(set(names) - set(CAP_NUMBERS))
    if unknown:
        raise ValueError(f"unknown capability name(s) {unknown}")


def _prctl(option: int, arg: int = 0, what: str = "") -> int:
    res = _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0))
    if res < 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"prctl {what}: {os.strerror(err)}")
    return res


def current() -> CapSets:
    """The calling thread's effective, permitted, inheritable and bounding sets."""
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"capget: {os.strerror(err)}")

    def join(field: str) -> int:
        return getattr(data[0], field) | getattr(data[1], field) << 32

    bounding = frozenset(n for n in _known()
                         if _prctl(PR_CAPBSET_READ, CAP_NUMBERS[n], f"CAPBSET_READ {n}") == 1)
    return CapSets(_names(join("effective")), _names(join("permitted")),
                   _names(join("inheritable")), bounding)


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        data[i].effective = effective >> (32 * i) & 0xFFFFFFFF
        data[i].permitted = permitted >> (32 * i) & 0xFFFFFFFF
        data[i].inheritable = inheritable >> (32 * i) & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"capset(effective={effective:#x}, permitted={permitted:#x}):"
                                  f" {os.strerror(err)}")


def no_new_privs() -> bool:
    """Whether PR_SET_NO_NEW_PRIVS is set on the calling thread."""
    return _prctl(PR_GET_NO_NEW_PRIVS, what="GET_NO_NEW_PRIVS") == 1


def thread_caps(tid: int) -> tuple[int, int]:
    """(CapEff, CapBnd) of thread `tid` of this process, from /proc."""
    values = {}
    with open(f"/proc/self/task/{tid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapBnd"):
                values[key] = int(value.strip(), 16)
    return values["CapEff"], values["CapBnd"]


def daemon_required(tracer_open: bool = True, low_ports: bool = True) -> set[str]:
    """The capabilities the daemon keeps after start-up.

    `tracer_open`: the BPF programs are loaded and attached already (their fds carry the
    rights), so CAP_BPF and CAP_PERFMON can go too. `low_ports`: host listeners may reuse an
    overlay port below 1024.
    """
    keep = {name for name, (when, _) in CAPABILITIES.items()
            if when == "kept" or not tracer_open}
    if not low_ports:
        keep.discard("CAP_NET_BIND_SERVICE")
    return keep


def chart_capabilities() -> list[str]:
    """The Kubernetes spelling (no ``CAP_``) of `CAPABILITIES`, in that order: what the Helm
    chart adds to the router container (all others dropped)."""
    return [name.removeprefix("CAP_") for name in CAPABILITIES]


def drop_privileges(keep: set[str] | frozenset[str]) -> DroppedReport:
    """Reduce every capability set of the calling thread to `keep` and set no_new_privs.

    Order: ambient cleared, bounding set reduced (if CAP_SETPCAP is effective; it goes with
    the rest), inheritable cleared, permitted and effective set to `keep`. Idempotent; a
    capability in `keep` that is not held is reported in `missing`, never gained.
    """
    _check_names(keep)
    before = current()
    held = before.permitted
    # ambient capabilities would survive execve of unprivileged programs: clear them
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "CAP_AMBIENT_CLEAR_ALL")
    bounding_dropped, bounding_kept = [], []
    for name in sorted(before.bounding - keep, key=CAP_NUMBERS.__getitem__):
        if "CAP_SETPCAP" not in before.effective:
            bounding_kept.append(name)  # unreachable once not permitted, under no_new_privs
            continue
        _prctl(PR_CAPBSET_DROP, CAP_NUMBERS[name], f"CAPBSET_DROP {name}")
        bounding_dropped.append(name)
    kept = held & keep
    _capset(_mask(kept), _mask(kept), 0)
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "SET_NO_NEW_PRIVS")
    after = current()
    if after.permitted != kept or after.effective != kept or \
            after.bounding - keep - set(bounding_kept):
        raise PrivilegeError(1, f"capabilities after the drop are {sorted(after.permitted)}, "
                                f"expected {sorted(kept)}")
    me = threading.get_native_id()
    limit = _mask(kept)
    others = []
    for entry in os.listdir("/proc/self/task"):
        tid = int(entry)
        if tid == me:
            continue
        try:
            eff, bnd = thread_caps(tid)
        except (OSError, KeyError):
            continue  # the thread ended
        if eff & ~limit or bnd & ~_mask(after.bounding):
            others.append(tid)
    return DroppedReport(
        kept=tuple(sorted(kept, key=CAP_NUMBERS.__getitem__)),
        dropped=tuple(sorted(held - kept, key=CAP_NUMBERS.__getitem__)),
        bounding_dropped=tuple(bounding_dropped),
        missing=tuple(sorted(set(keep) - held, key=CAP_NUMBERS.__getitem__)),
        no_new_privs=no_new_privs(),
        other_threads=tuple(sorted(others)),
        bounding_kept=tuple(bounding_kept),
    )
