"""`ebpf-router doctor`: the real checks pass on this machine, and each reports what is missing
when pointed at something that is not there (root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ebpfrouter import doctor
from ebpfrouter.demo import PACKAGE_ROOT, child_env
from ebpfrouter.doctor import (
    FAIL,
    INFO,
    OK,
    REQUIRED,
    UNKNOWN,
    WARN,
    DoctorOptions,
    run_checks,
)

pytestmark = pytest.mark.root

NAMES = ["kernel", "btf", "tracefs", "tracepoints", "bpffs", "cgroup2", "pidfd_getfd",
         "kprobes", "lockdown", "capabilities", "bpf_send_signal", "sock_addr_hooks",
         "overlay_if", "host_if"]


def by_name(checks: list[doctor.Check]) -> dict[str, doctor.Check]:
    return {c.name: c for c in checks}


def cli(*args: str, preexec=None) -> tuple[int, dict]:
    """`ebpf-router doctor --json ARGS` in a child process: exit code and its JSON."""
    proc = subprocess.run([sys.executable, "-m", "ebpfrouter.cli", "doctor", "--json", *args],
                          capture_output=True, text=True, timeout=60, env=child_env(),
                          cwd=str(PACKAGE_ROOT), preexec_fn=preexec)
    assert proc.stderr == "", proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_every_required_item_is_here() -> None:
    checks = run_checks(DoctorOptions(host_if="lo"))
    assert [c.name for c in checks] == NAMES
    got = by_name(checks)
    for c in checks:
        assert c.verdict in (OK, INFO), c
    assert "21 of 21" in got["btf"].detail
    assert got["tracepoints"].detail.startswith("all 13")
    # This kernel has no kprobes: reported, never counted against the node.
    assert got["kprobes"].verdict == INFO and got["kprobes"].detail.startswith("absent")
    assert got["kprobes"].need == "not needed"
    assert got["overlay_if"].verdict == INFO and "not given" in got["overlay_if"].detail
    assert "127.0.0.1" in got["host_if"].detail
    assert doctor.overall(checks) == (True, "READY: the router can run here")
    text = doctor.format_report(checks)
    assert len(text.splitlines()) == len(NAMES) + 1
    assert text.splitlines()[-1] == "READY: the router can run here"


def test_cli_json_exit_zero_when_ready() -> None:
    code, report = cli("--host-if", "lo")
    assert code == 0 and report["ready"] is True, report
    assert [c["name"] for c in report["checks"]] == NAMES
    assert set(report["checks"][0]) == {"name", "verdict", "need", "detail"}


def test_missing_btf_is_reported_and_fails(tmp_path: Path) -> None:
    code, report = cli("--btf", str(tmp_path / "vmlinux"))
    btf = next(c for c in report["checks"] if c["name"] == "btf")
    assert btf["verdict"] == FAIL and btf["need"] == REQUIRED
    assert str(tmp_path / "vmlinux") in btf["detail"]
    assert code == 1 and report["ready"] is False
    assert report["verdict"] == "NOT READY: missing btf"
    (tmp_path / "garbage").write_bytes(b"\x00" * 64)
    got = by_name(run_checks(DoctorOptions(btf_path=str(tmp_path / "garbage"))))
    assert got["btf"].verdict == FAIL


def test_tracepoints_missing_one_are_named(tmp_path: Path) -> None:
    """A tracefs tree with real format files, all but one: that one is named."""
    from ebpfrouter.tracer_programs import TRACEPOINTS

    real = Path("/sys/kernel/tracing/events")
    for _, category, name in TRACEPOINTS[1:]:
        (tmp_path / "events" / category / name).mkdir(parents=True)
        shutil.copy(real / category / name / "format", tmp_path / "events" / category / name)
    got = by_name(run_checks(DoctorOptions(tracefs_path=str(tmp_path))))
    assert got["tracefs"].verdict == OK
    _, category, name = TRACEPOINTS[0]
    assert got["tracepoints"].verdict == FAIL
    assert f"12 of 13 found; missing {category}:{name}" in got["tracepoints"].detail
    empty = tmp_path / "empty"
    empty.mkdir()
    got = by_name(run_checks(DoctorOptions(tracefs_path=str(empty))))
    assert got["tracefs"].verdict == FAIL and got["tracepoints"].verdict == FAIL


@pytest.mark.parametrize(("content", "verdict", "shown"), [
    ("none integrity [confidentiality]\n", FAIL, "confidentiality"),
    ("none [integrity] confidentiality\n", OK, "integrity"),
    ("[none] integrity confidentiality\n", OK, "none"),
    ("garbage\n", UNKNOWN, "no [selected] mode"),
])
def test_lockdown_modes(tmp_path: Path, content: str, verdict: str, shown: str) -> None:
    path = tmp_path / "lockdown"
    path.write_text(content)
    check = doctor.check_lockdown(DoctorOptions(lockdown_path=str(path)))
    assert check.verdict == verdict and shown in check.detail, check
    missing = doctor.check_lockdown(DoctorOptions(lockdown_path=str(tmp_path / "none")))
    assert missing.verdict == UNKNOWN and "cannot read" in missing.detail


def test_lockdown_read_through_a_private_securityfs_leaves_mounts_alone() -> None:
    before = Path("/proc/self/mounts").read_text()
    check = doctor.check_lockdown(DoctorOptions())
    assert check.verdict == OK, check
    assert Path("/proc/self/mounts").read_text() == before


def test_private_mount_is_real_and_contained() -> None:
    before = Path("/proc/self/mounts").read_text()
    found = doctor.in_private_mount("tracefs",
                                    lambda root: sorted(os.listdir(f"{root}/events/syscalls")))
    assert "sys_enter_connect" in found
    with pytest.raises(OSError, match="mount -t nosuchfs: No such device"):
        doctor.in_private_mount("nosuchfs", lambda root: None)
    assert Path("/proc/self/mounts").read_text() == before


def doctor_without(caps: set[str]) -> tuple[int, dict[str, dict]]:
    """`doctor --json` in a child that really dropped `caps`: exit code, checks by name."""
    code = ("import sys\n"
            "from ebpfrouter.privileges import CAPABILITIES, drop_privileges\n"
            f"drop_privileges(set(CAPABILITIES) - set({sorted(caps)!r}))\n"
            "from ebpfrouter.doctor import main\n"
            "sys.exit(main(['--json']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=child_env(), cwd=str(PACKAGE_ROOT))
    assert proc.stdout, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ready"] is (proc.returncode == 0), report
    return proc.returncode, {c["name"]: c for c in report["checks"]}


def test_capabilities_missing_after_a_real_drop() -> None:
    """Without CAP_BPF and CAP_SYS_ADMIN: both named, BPF loads and private mounts fail."""
    code, checks = doctor_without({"CAP_BPF", "CAP_SYS_ADMIN"})
    assert code == 1
    assert checks["tracefs"]["verdict"] == OK  # mounted already: nothing to try
    cap = checks["capabilities"]
    assert cap["verdict"] == FAIL, cap
    assert cap["detail"].startswith("missing CAP_BPF, CAP_SYS_ADMIN (CAP_BPF: bpf(2)")
    for name in ("bpf_send_signal", "sock_addr_hooks"):
        assert checks[name]["verdict"] == WARN, checks[name]
        assert "Operation not permitted" in checks[name]["detail"]
    assert checks["lockdown"]["verdict"] == UNKNOWN  # securityfs cannot be mounted to read it
    assert "unshare(CLONE_NEWNS): Operation not permitted" in checks["lockdown"]["detail"]
    assert doctor.check_capabilities(held=set()).detail.startswith("missing CAP_BPF, CAP_PERF")


def test_cap_sys_admin_stands_in_for_cap_bpf() -> None:
    """The kernel's bpf_capable() takes CAP_SYS_ADMIN too: a real load proves it."""
    code, checks = doctor_without({"CAP_BPF"})
    assert code == 0
    cap = checks["capabilities"]
    assert cap["verdict"] == OK and "CAP_BPF not held, CAP_SYS_ADMIN stands in" in cap["detail"]
    assert checks["bpf_send_signal"]["verdict"] == OK


def test_interfaces_as_run_takes_them(netns_name: str) -> None:
    """A missing host interface fails; a VXLAN overlay in a fresh netns is described."""
    from pyroute2 import NetNS

    from injector.netns import setns_path

    code, report = cli("--host-if", "nosuch0")
    host = next(c for c in report["checks"] if c["name"] == "host_if")
    assert code == 1 and host["verdict"] == FAIL and "'nosuch0' does not exist" in host["detail"]
    with NetNS(netns_name) as ns:
        ns.link("add", ifname="flannel.1", kind="vxlan", vxlan_id=1, vxlan_port=8472)
        index = ns.link_lookup(ifname="flannel.1")[0]
        ns.addr("add", index=index, address="10.244.1.0", prefixlen=32)
    enter = lambda: setns_path(f"/run/netns/{netns_name}")  # noqa: E731
    code, report = cli("--overlay-if", "flannel.1", "--host-if", "lo", preexec=enter)
    overlay = next(c for c in report["checks"] if c["name"] == "overlay_if")
    assert overlay["verdict"] == FAIL and "flannel.1: vxlan; down" in overlay["detail"]
    with NetNS(netns_name) as ns:
        ns.link("set", index=index, state="up")
    code, report = cli("--overlay-if", "flannel.1", "--host-if", "lo", preexec=enter)
    overlay = next(c for c in report["checks"] if c["name"] == "overlay_if")
    assert code == 0 and overlay["verdict"] == OK, overlay
    assert "vxlan; up" in overlay["detail"] and "10.244.1.0" in overlay["detail"]
    assert "routes to 0 peer node(s)" in overlay["detail"]
    env_code = subprocess.run([sys.executable, "-m", "ebpfrouter.cli", "doctor"],
                              capture_output=True, text=True, timeout=60, preexec_fn=enter,
                              env={**child_env(), "OVERLAY_IF": "flannel.1", "HOST_IF": "nope"},
                              cwd=str(PACKAGE_ROOT))
    assert env_code.returncode == 1
    assert "MISSING  host_if" in env_code.stdout and "OK       overlay_if" in env_code.stdout


def test_kprobes_present_when_the_pmu_is(tmp_path: Path) -> None:
    check = doctor.check_kprobes(DoctorOptions(kprobe_pmu=str(tmp_path)))
    assert check.verdict == INFO and check.detail.startswith("present")


def test_unmounted_file_systems_are_really_mounted_privately(tmp_path: Path) -> None:
    """Seen through a mount table without them, tracefs, bpffs and cgroup2 are mounted in a
    throw-away namespace to prove they can be, and the tracepoints are read from there."""
    mounts = tmp_path / "mounts"
    mounts.write_text("proc /proc proc rw,relatime 0 0\n")
    got = by_name(run_checks(DoctorOptions(mounts_path=str(mounts))))
    for name, where in (("tracefs", "/sys/kernel/tracing"), ("bpffs", "/sys/fs/bpf"),
                        ("cgroup2", "/sys/fs/cgroup")):
        assert got[name].verdict == OK, got[name]
        assert got[name].detail == (f"not mounted at {where}, but mountable (tried in a "
                                    "private mount namespace)")
    assert got["tracepoints"].verdict == OK and got["tracepoints"].detail.startswith("all 13")
    assert got["kprobes"].detail.startswith("absent")
