"""The BPF file system (bpffs): find or mount it, check that a pin path lives on it."""

from __future__ import annotations

import os

from .syscall import mount, mount_point

DEFAULT_ROOT = "/sys/fs/bpf"


def bpffs_root(mount_if_missing: bool = True) -> str:
    """Return a bpffs mount point, mounting one at /sys/fs/bpf if none exists."""
    found = mount_point("bpf", DEFAULT_ROOT)
    if found is not None:
        return found
    if not mount_if_missing:
        raise FileNotFoundError(f"no bpf file system is mounted (expected at {DEFAULT_ROOT})")
    os.makedirs(DEFAULT_ROOT, exist_ok=True)
    mount("bpf", DEFAULT_ROOT, "bpf", "mode=0700")
    return DEFAULT_ROOT


def _on_bpffs(path: str) -> bool:
    directory = os.path.dirname(os.path.abspath(path)) or "/"
    best = ""
    fstype = ""
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            inside = directory == mnt or directory.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    return fstype == "bpf"


def prepare_pin_path(path: str, what: str) -> str:
    """Make sure `path` can be pinned: mount bpffs under /sys/fs/bpf if needed, create
    intermediate directories there, and raise a clear error for paths off bpffs."""
    path = os.path.abspath(path)
    if path.startswith(DEFAULT_ROOT + "/"):
        bpffs_root()
    if not _on_bpffs(path):
        raise ValueError(
            f"cannot pin {what} at {path}: {os.path.dirname(path)} is not on a bpf file system"
        )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path
