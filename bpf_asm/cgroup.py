"""cgroup v2: find or mount the unified hierarchy, open a cgroup directory for attaching.

cgroup-attached programs (`attach_cgroup`) need a directory of a cgroup2 file system. On a
pure v2 host that is /sys/fs/cgroup; on a hybrid one (v1 controllers in a tmpfs at
/sys/fs/cgroup) systemd mounts v2 at /sys/fs/cgroup/unified. A cgroup's id, as BPF reports it
(link info, `bpf_get_current_cgroup_id`), is the inode number of its directory.
"""

from __future__ import annotations

import errno
import os

from .syscall import (
    CGROUP2_SUPER_MAGIC,
    CGROUP_SUPER_MAGIC,
    fstatfs_type,
    mount,
    mount_point,
)

DEFAULT_ROOT = "/sys/fs/cgroup"
HYBRID_ROOT = "/sys/fs/cgroup/unified"


class NotCgroup2Error(ValueError):
    """A path that is not a directory of a cgroup v2 file system."""

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path} is not a cgroup v2 directory: {why}")
        self.path = path


def cgroup2_root(mount_if_missing: bool = True) -> str:
    """A cgroup2 mount point: /sys/fs/cgroup if it is one, else any mounted one (e.g.
    /sys/fs/cgroup/unified). With none, mount cgroup2 at /sys/fs/cgroup/unified when
    /sys/fs/cgroup holds a v1 layout (a tmpfs), else at /sys/fs/cgroup."""
    found = mount_point("cgroup2", DEFAULT_ROOT)
    if found is not None:
        return found
    if not mount_if_missing:
        raise FileNotFoundError(errno.ENOENT, "no cgroup2 file system is mounted "
                                f"(looked for {DEFAULT_ROOT} and {HYBRID_ROOT})")
    target = HYBRID_ROOT if os.path.ismount(DEFAULT_ROOT) else DEFAULT_ROOT
    os.makedirs(target, exist_ok=True)
    mount("cgroup2", target, "cgroup2")
    return target


def open_cgroup(path: str) -> int:
    """Open cgroup directory `path` (O_RDONLY | O_DIRECTORY | O_CLOEXEC) and return the fd.
    Raises NotCgroup2Error for anything but a directory of a cgroup2 file system (cgroup v1
    hierarchies included: BPF attaches only to v2), FileNotFoundError if it is missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise NotCgroup2Error(path, "not a directory") from None
    try:
        fstype = fstatfs_type(fd, path)
        if fstype != CGROUP2_SUPER_MAGIC:
            why = ("it is a cgroup v1 hierarchy; BPF programs attach to cgroup v2 only"
                   if fstype == CGROUP_SUPER_MAGIC else
                   f"its file system type is {fstype:#x}, not cgroup2 "
                   f"({CGROUP2_SUPER_MAGIC:#x})")
            hint = _hint()
            raise NotCgroup2Error(path, why + (f"; cgroup2 is mounted at {hint}" if hint else ""))
    except BaseException:
        os.close(fd)
        raise
    return fd


def cgroup_id(path: str) -> int:
    """The id BPF gives cgroup `path` (the inode number of its directory)."""
    fd = open_cgroup(path)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _hint() -> str | None:
    try:
        return mount_point("cgroup2", DEFAULT_ROOT)
    except OSError:  # pragma: no cover - /proc unreadable
        return None


__all__ = ["DEFAULT_ROOT", "HYBRID_ROOT", "NotCgroup2Error", "cgroup2_root",
           "cgroup_id", "open_cgroup"]
