"""Bypass rules: the seed's one-rule-per-file format, filters then validators, hot reload.

A rule file holds `key=value` lines (`#` starts a comment, blank lines are ignored)::

    type=cidr            # or podLabel, containerLabel
    from=10.244.1.0/24   # server CIDR (cidr rules)
    to=10.244.2.0/24     # client CIDR
    reverse=true         # also match with server and client exchanged
    name=app             # label name (label rules)
    value=iperf          # label value
    swap=eager           # cidr rules only, optional: how new connections to listeners in
                         # `from` are swapped: eager (at connect()/accept() return) or late
                         # (after --min-age); without it the router learns it per listener

Label rules are *filters* (applied first), cidr rules *validators* (applied after). With no
filter rules everything passes the filter stage; with no validators everything passes that
stage. Within a stage one matching rule is enough.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

RULE_TYPES = {"cidr": "cidr", "podlabel": "podLabel", "containerlabel": "containerLabel"}
KEYS_FOR_TYPE = {
    "cidr": ({"type", "from", "to"}, {"reverse", "swap"}),
    "podLabel": ({"type", "name", "value"}, set()),
    "containerLabel": ({"type", "name", "value"}, set()),
}
ALL_KEYS = {"type", "name", "value", "from", "to", "reverse", "swap"}
SWAP_MODES = ("eager", "late")
MAX_RULE_FILE_BYTES = 64 * 1024


class RuleError(ValueError):
    """A rule file is wrong; `path` and `line` (1-based, or None) say where."""

    def __init__(self, path: str | os.PathLike[str], line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass(frozen=True)
class ConnectionFacts:
    """What the rules may look at for one connection, seen from the local process."""

    server_addr: str
    server_port: int
    client_addr: str
    client_port: int
    pod_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    container_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One parsed rule; `source` is the file it came from."""

    kind: str
    source: str
    name: str | None = None
    value: str | None = None
    from_net: IPNetwork | None = None
    to_net: IPNetwork | None = None
    reverse: bool = False
    swap: str | None = None  # cidr rules: "eager" or "late" for listeners in from_net

    @property
    def is_filter(self) -> bool:
        """Label rules filter; cidr rules validate."""
        return self.kind != "cidr"

    def matches(self, facts: ConnectionFacts) -> bool:
        """True if this rule matches the connection."""
        if self.kind == "podLabel":
            return facts.pod_labels.get(self.name or "") == self.value
        if self.kind == "containerLabel":
            return facts.container_labels.get(self.name or "") == self.value
        server, client = _addr(facts.server_addr), _addr(facts.client_addr)
        if server is None or client is None:
            return False
        assert self.from_net is not None and self.to_net is not None
        if _within(server, self.from_net) and _within(client, self.to_net):
            return True
        return self.reverse and _within(server, self.to_net) and _within(client, self.from_net)


def _addr(text: str) -> IPAddress | None:
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _within(addr: IPAddress, net: IPNetwork) -> bool:
    return addr.version == net.version and addr in net


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1].strip()
    return text


def _network(path: Path, line: int, key: str, text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise RuleError(path, line, f"{key}={text!r} is not a CIDR (like 10.244.0.0/16)") from None


def parse_rule_text(text: str, path: str | os.PathLike[str] = "<rule>") -> Rule:
    """Parse the text of one rule file; raise `RuleError` naming file and line."""
    where = Path(path)
    seen: dict[str, tuple[str, int]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "=" not in line:
            raise RuleError(where, number, f"expected key=value, got {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        value = _unquote(value)
        if key not in ALL_KEYS:
            raise RuleError(where, number, f"unknown key {key!r} (known: "
                            f"{', '.join(sorted(ALL_KEYS))})")
        if key in seen:
            raise RuleError(where, number, f"duplicate key {key!r} (first on line {seen[key][1]})")
        if not value:
            raise RuleError(where, number, f"empty value for {key!r}")
        seen[key] = (value, number)
    if "type" not in seen:
        raise RuleError(where, None, "missing key 'type' (cidr, podLabel or containerLabel)")
    type_text, type_line = seen["type"]
    kind = RULE_TYPES.get(type_text.lower())
    if kind is None:
        raise RuleError(where, type_line, f"unknown type {type_text!r} "
                        "(expected cidr, podLabel or containerLabel)")
    required, optional = KEYS_FOR_TYPE[kind]
    for key, (_, number) in seen.items():
        if key not in required | optional:
            raise RuleError(where, number, f"key {key!r} does not apply to type {kind}")
    missing = sorted(required - seen.keys())
    if missing:
        raise RuleError(where, None, f"type {kind} needs key(s) {', '.join(missing)}")
    if kind != "cidr":
        return Rule(kind=kind, source=str(where), name=seen["name"][0], value=seen["value"][0])
    reverse = False
    if "reverse" in seen:
        text_value, number = seen["reverse"]
        if text_value.lower() not in ("true", "false"):
            raise RuleError(where, number, f"reverse={text_value!r}: expected true or false")
        reverse = text_value.lower() == "true"
    from_net = _network(where, seen["from"][1], "from", seen["from"][0])
    to_net = _network(where, seen["to"][1], "to", seen["to"][0])
    if from_net.version != to_net.version:
        raise RuleError(where, seen["to"][1], "from and to mix IPv4 and IPv6")
    swap = None
    if "swap" in seen:
        swap, number = seen["swap"][0].lower(), seen["swap"][1]
        if swap not in SWAP_MODES:
            raise RuleError(where, number, f"swap={seen['swap'][0]!r}: expected eager or late")
    return Rule(kind=kind, source=str(where), from_net=from_net, to_net=to_net, reverse=reverse,
                swap=swap)


def rule_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The rule files of `directory`: visible regular files (symlinks followed), sorted."""
    base = Path(directory)
    files = []
    for entry in sorted(os.listdir(base)):
        if entry.startswith("."):  # ConfigMap internals (..data, ..2024_...) and dotfiles
            continue
        path = base / entry
        if path.is_file():
            files.append(path)
    return files


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """Filters and validators loaded from a directory."""

    filters: tuple[Rule, ...] = ()
    validators: tuple[Rule, ...] = ()
    closed: bool = False  # bypasses nothing (the rules could not be loaded)

    @classmethod
    def bypass_nothing(cls) -> RuleSet:
        """The rule set used until a rules directory loads: no connection is bypassed."""
        return cls(closed=True)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], missing_ok: bool = False) -> RuleSet:
        """Load every rule file of `directory`; raise `RuleError` on the first bad one."""
        base = Path(directory)
        if not base.is_dir():
            if missing_ok and not base.exists():
                return cls()
            raise RuleError(base, None, "rules directory does not exist or is not a directory")
        try:
            paths = rule_files(base)
        except OSError as exc:
            raise RuleError(base, None, f"cannot list: {exc.strerror or exc}") from None
        rules = []
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    data = handle.read(MAX_RULE_FILE_BYTES + 1)
            except OSError as exc:
                raise RuleError(path, None, f"cannot read: {exc.strerror or exc}") from None
            if len(data) > MAX_RULE_FILE_BYTES:
                raise RuleError(path, None, f"larger than {MAX_RULE_FILE_BYTES} bytes")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                line = data[: exc.start].count(b"\n") + 1
                raise RuleError(path, line, "not UTF-8 text") from None
            rules.append(parse_rule_text(text, path))
        return cls.from_rules(rules)

    @classmethod
    def from_rules(cls, rules: list[Rule]) -> RuleSet:
        """Split rules into filters and validators."""
        return cls(
            filters=tuple(r for r in rules if r.is_filter),
            validators=tuple(r for r in rules if not r.is_filter),
        )

    def allows(self, conn: ConnectionFacts) -> bool:
        """True if the connection should be bypassed."""
        if self.closed:
            return False
        if self.filters and not any(rule.matches(conn) for rule in self.filters):
            return False
        return not self.validators or any(rule.matches(conn) for rule in self.validators)

    def swap_mode(self, listener_addr: str) -> str | None:
        """The `swap=` of the first cidr rule (file order) whose `from` holds this listener
        address ("eager" or "late"); None: no rule says, the router decides."""
        addr = _addr(listener_addr)
        for rule in self.validators:
            if (rule.swap is not None and addr is not None and rule.from_net is not None
                    and _within(addr, rule.from_net)):
                return rule.swap
        return None

    def __len__(self) -> int:
        return len(self.filters) + len(self.validators)


def _signature(directory: Path) -> tuple[object, ...]:
    """Everything whose change means the rules may have changed (ConfigMap symlink swaps too)."""
    parts: list[object] = []
    try:
        parts.append(os.path.realpath(directory))
        st = os.stat(directory)
        parts.append((st.st_ino, st.st_mtime_ns))
        data = directory / "..data"
        if data.is_symlink():
            parts.append(os.readlink(data))
        for entry in sorted(os.listdir(directory)):
            if entry.startswith("."):
                continue
            path = directory / entry
            try:
                st = os.stat(path)
            except OSError:
                parts.append((entry, None))
                continue
            digest = None
            if st.st_size <= MAX_RULE_FILE_BYTES and path.is_file():
                with open(path, "rb") as handle:  # small files: hash them, mtimes can be coarse
                    digest = hashlib.blake2b(handle.read(), digest_size=16).digest()
            parts.append((entry, os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size,
                          digest))
    except OSError as exc:
        parts.append(("error", exc.errno))
    return tuple(parts)


class RuleWatcher:
    """Polls a rules directory and reloads on change, keeping the old rules if new ones are bad."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        on_change: Callable[[RuleSet], None] | None = None,
        strict: bool = True,
    ) -> None:
        """Load now; with `strict`, a bad initial rule set raises `RuleError`.

        Without `strict`, a bad initial rule set is logged and nothing is bypassed
        (`RuleSet.bypass_nothing`) until a later `poll()` loads good rules.
        """
        self.directory = Path(directory)
        self.on_change = on_change
        self.last_error: RuleError | None = None
        self.reloads = 0
        self._signature = _signature(self.directory)
        try:
            self.rules = RuleSet.load(self.directory, missing_ok=True)
        except RuleError as exc:
            if strict:
                raise
            log.error("rules: %s; bypassing nothing until the rules load", exc)
            self.last_error = exc
            self.rules = RuleSet.bypass_nothing()

    def poll(self) -> bool:
        """Check for changes; return True if a new rule set was installed."""
        signature = _signature(self.directory)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            rules = RuleSet.load(self.directory, missing_ok=True)
        except RuleError as exc:
            log.error("rules: %s; keeping the previous %d rule(s)", exc, len(self.rules))
            self.last_error = exc
            return False
        self.last_error = None
        self.rules = rules
        self.reloads += 1
        log.info("rules: reloaded %d rule(s) from %s", len(rules), self.directory)
        if self.on_change is not None:
            self.on_change(rules)
        return True
