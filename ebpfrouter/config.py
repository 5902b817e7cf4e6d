"""Router configuration: environment variables (the seed's names) overridden by flags."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path

DEFAULT_PORT = 1234
DEFAULT_LOGLEVEL = "WARNING"
DEFAULT_RULES_DIR = "/etc/rules"
DEFAULT_CONTROL_SOCKET = "/run/ebpf-router/control.sock"
LOGLEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MIN_KEY_BYTES = 16


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Everything the daemon needs to start, after env and flags are merged."""

    overlay_if: str | None = None
    host_if: str | None = None
    router_port: int = DEFAULT_PORT
    loglevel: str = DEFAULT_LOGLEVEL
    rules_dir: str = DEFAULT_RULES_DIR
    key: bytes | None = dataclasses.field(default=None, repr=False)
    key_file: str | None = None
    control_socket: str = DEFAULT_CONTROL_SOCKET

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, args: argparse.Namespace | None = None
    ) -> RouterConfig:
        """Build from `env` (default `os.environ`), then let non-None `args` flags override.

        Values are parsed (port, loglevel, key file read) but interfaces are not checked:
        call `validate()` for that.
        """
        env = os.environ if env is None else env
        raw: dict[str, str | None] = {
            "overlay_if": env.get("OVERLAY_IF") or None,
            "host_if": env.get("HOST_IF") or None,
            "router_port": env.get("ROUTER_PORT") or None,
            "loglevel": env.get("ROUTER_LOGLEVEL") or None,
            "rules_dir": env.get("ROUTER_RULES_DIR") or None,
            "key": env.get("ROUTER_KEY") or None,
            "key_file": env.get("ROUTER_KEY_FILE") or None,
            "control_socket": env.get("ROUTER_CONTROL_SOCKET") or None,
        }
        if args is not None:
            for name in raw:
                value = getattr(args, name, None)
                if value is not None:
                    raw[name] = str(value)
            if getattr(args, "key_file", None) is not None:
                raw["key"] = None  # a key file given as a flag beats ROUTER_KEY
        port = parse_port(raw["router_port"], "ROUTER_PORT") if raw["router_port"] else None
        level = parse_loglevel(raw["loglevel"]) if raw["loglevel"] else DEFAULT_LOGLEVEL
        key: bytes | None = raw["key"].encode() if raw["key"] else None
        if key is None and raw["key_file"]:
            key = read_key_file(raw["key_file"])
        return cls(
            overlay_if=raw["overlay_if"],
            host_if=raw["host_if"],
            router_port=DEFAULT_PORT if port is None else port,
            loglevel=level,
            rules_dir=raw["rules_dir"] or DEFAULT_RULES_DIR,
            key=key,
            key_file=raw["key_file"],
            control_socket=raw["control_socket"] or DEFAULT_CONTROL_SOCKET,
        )

    def validate(self, check_interfaces: bool = True, require_key: bool = True) -> RouterConfig:
        """Check the values that depend on the machine; raise `ConfigError` naming the thing."""
        for env_name, value in (("OVERLAY_IF", self.overlay_if), ("HOST_IF", self.host_if)):
            if not value:
                raise ConfigError(f"{env_name} is not set (the interface name is required)")
            if check_interfaces and not interface_exists(value):
                raise ConfigError(f"{env_name}: interface {value!r} does not exist")
        parse_port(str(self.router_port), "ROUTER_PORT")
        parse_loglevel(self.loglevel)
        if require_key:
            if self.key is None:
                raise ConfigError("no peer key: set ROUTER_KEY or ROUTER_KEY_FILE")
            if len(self.key) < MIN_KEY_BYTES:
                raise ConfigError(f"peer key too short: {len(self.key)} bytes, "
                                  f"need at least {MIN_KEY_BYTES}")
        return self

    @property
    def log_level_number(self) -> int:
        """The `logging` module's numeric level."""
        return int(logging.getLevelName(self.loglevel))


def parse_port(text: str | None, what: str = "port") -> int:
    """Parse a TCP port 1..65535 or raise `ConfigError`."""
    try:
        port = int(str(text).strip(), 10)
    except ValueError:
        raise ConfigError(f"{what}: {text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{what}: {port} is out of range 1..65535")
    return port


def parse_loglevel(text: str) -> str:
    """Normalise a log level name or raise `ConfigError`."""
    level = text.strip().upper()
    if level not in LOGLEVELS:
        raise ConfigError(f"ROUTER_LOGLEVEL: {text!r} is not one of {', '.join(LOGLEVELS)}")
    return level


def read_key_file(path: str) -> bytes:
    """Read the shared peer key (surrounding whitespace stripped)."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"ROUTER_KEY_FILE {path}: {exc.strerror or exc}") from None
    if not data:
        raise ConfigError(f"ROUTER_KEY_FILE {path}: file is empty")
    return data


def interface_exists(name: str) -> bool:
    """True if a network interface `name` exists in the current network namespace."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags that override the environment (dest names match `RouterConfig`)."""
    parser.add_argument("--overlay-if", dest="overlay_if", help="overlay interface (OVERLAY_IF)")
    parser.add_argument("--host-if", dest="host_if", help="host interface (HOST_IF)")
    parser.add_argument("--port", dest="router_port", help="peer port (ROUTER_PORT, 1234)")
    parser.add_argument("--loglevel", dest="loglevel", help="ROUTER_LOGLEVEL (WARNING)")
    parser.add_argument("--rules-dir", dest="rules_dir", help="rules directory (/etc/rules)")
    parser.add_argument("--key-file", dest="key_file", help="shared peer key file")
    parser.add_argument("--control-socket", dest="control_socket", help="status socket path")
