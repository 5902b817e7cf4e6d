"""tracefs: find or mount it, and parse tracepoint `format` files into named fields.

    fmt = event_format("syscalls", "sys_enter_close")
    fmt.id                  # perf tracepoint id
    fmt.field("fd").offset  # where a program reads the argument in its context
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .syscall import mount, mount_point

DEFAULT_ROOT = "/sys/kernel/tracing"
_LEGACY_ROOT = "/sys/kernel/debug/tracing"


class TracepointNotFoundError(FileNotFoundError):
    """No such tracepoint (category:name) in tracefs."""

    def __init__(self, category: str, name: str, path: str) -> None:
        super().__init__(2, f"tracepoint {category}:{name} not found (no {path})")
        self.category, self.name = category, name


def tracefs_root(mount_if_missing: bool = True) -> str:
    """The tracefs mount point, mounting tracefs at /sys/kernel/tracing if needed."""
    found = mount_point("tracefs", DEFAULT_ROOT)
    if found is not None:
        return found
    if os.path.isdir(os.path.join(_LEGACY_ROOT, "events")):
        return _LEGACY_ROOT
    if not mount_if_missing:
        raise FileNotFoundError("tracefs is not mounted")
    mount("nodev", DEFAULT_ROOT, "tracefs")
    return DEFAULT_ROOT


@dataclass(frozen=True)
class Field:
    """One field of a tracepoint record: C declaration, offset and size in bytes, signedness.

    `array_len` is set for fixed arrays (`char comm[16]`); `data_loc` for `__data_loc` fields,
    whose slot holds (length << 16 | offset) of the variable part."""

    name: str
    type: str
    offset: int
    size: int
    signed: bool
    array_len: int | None = None
    data_loc: bool = False

    @property
    def common(self) -> bool:
        """True for the header fields every event shares (common_type, common_pid, ...)."""
        return self.name.startswith("common_")


@dataclass(frozen=True)
class EventFormat:
    """A tracepoint's parsed `format` file."""

    category: str
    name: str
    id: int
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        """The field called `name` (KeyError naming the event and its fields if absent)."""
        for f in self.fields:
            if f.name == name:
                return f
        known = ", ".join(f.name for f in self.fields)
        raise KeyError(f"tracepoint {self.category}:{self.name} has no field {name!r} "
                       f"(fields: {known})")

    @property
    def args(self) -> tuple[Field, ...]:
        """The event-specific fields (without the common_* header)."""
        return tuple(f for f in self.fields if not f.common)

    @property
    def size(self) -> int:
        """Bytes up to the end of the last fixed field."""
        return max((f.offset + f.size for f in self.fields), default=0)


_FIELD_RE = re.compile(
    r"field:(?P<decl>[^;]*);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);"
    r"(?:\s*signed:(?P<signed>-?\d+);)?"
)
_DECL_RE = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?:\[(?P<len>[^\]]*)\])?$")


def _parse_decl(decl: str) -> tuple[str, str, int | None, bool]:
    decl = decl.strip()
    data_loc = decl.startswith("__data_loc ")
    if data_loc:
        decl = decl[len("__data_loc "):]
        # "__data_loc char[] name": the [] belongs to the type.
        m = re.match(r"^(?P<type>.*\[\d*\])\s*(?P<name>\w+)$", decl)
        if m:
            return m["name"], m["type"], None, True
    m = _DECL_RE.match(decl)
    if not m:
        raise ValueError(f"cannot parse field declaration {decl!r}")
    length = m["len"]
    array_len = int(length, 0) if length and length.strip().isdigit() else None
    ctype = m["type"] + (f"[{length}]" if length is not None else "")
    return m["name"], ctype.strip(), array_len, data_loc


def parse_format(text: str, category: str = "", name: str = "") -> EventFormat:
    """Parse the text of an events/<category>/<name>/format file."""
    event_id = -1
    fields: list[Field] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("name:") and not name:
            name = line.split(":", 1)[1].strip()
        elif line.startswith("ID:"):
            event_id = int(line.split(":", 1)[1])
        elif line.startswith("field:"):
            m = _FIELD_RE.match(line)
            if not m:
                raise ValueError(f"{category}:{name}: cannot parse format line {line!r}")
            fname, ftype, alen, dloc = _parse_decl(m["decl"])
            fields.append(Field(fname, ftype, int(m["offset"]), int(m["size"]),
                                m["signed"] == "1", alen, dloc))
    if event_id < 0:
        raise ValueError(f"{category}:{name}: format has no ID line")
    return EventFormat(category, name, event_id, tuple(fields))


def event_dir(category: str, name: str) -> str:
    """Path of events/<category>/<name> in tracefs; TracepointNotFoundError if missing."""
    if not category or not name or "/" in category + name or ".." in (category, name):
        raise ValueError(f"bad tracepoint name {category!r}:{name!r}")
    path = os.path.join(tracefs_root(), "events", category, name)
    if not os.path.isdir(path):
        raise TracepointNotFoundError(category, name, path)
    return path


def event_format(category: str, name: str) -> EventFormat:
    """Read and parse the format of tracepoint `category:name`."""
    with open(os.path.join(event_dir(category, name), "format")) as f:
        return parse_format(f.read(), category, name)


def event_id(category: str, name: str) -> int:
    """The perf id of tracepoint `category:name`."""
    with open(os.path.join(event_dir(category, name), "id")) as f:
        return int(f.read())


def list_events(category: str) -> list[str]:
    """Names of the tracepoints in `category` (sorted)."""
    path = os.path.join(tracefs_root(), "events", category)
    if not os.path.isdir(path):
        raise FileNotFoundError(2, f"tracepoint category {category!r} not found (no {path})")
    return sorted(e for e in os.listdir(path) if os.path.isdir(os.path.join(path, e)))
