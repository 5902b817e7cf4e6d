"""RouterConfig: env parsing, flag overrides, validation messages."""

from __future__ import annotations

import argparse

import pytest

from ebpfrouter.config import ConfigError, RouterConfig, add_arguments


def flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_from_empty_env() -> None:
    cfg = RouterConfig.from_env({})
    assert cfg.router_port == 1234
    assert cfg.loglevel == "WARNING"
    assert cfg.rules_dir == "/etc/rules"
    assert cfg.overlay_if is None and cfg.key is None


def test_env_values() -> None:
    cfg = RouterConfig.from_env({"OVERLAY_IF": "flannel.1", "HOST_IF": "lo", "ROUTER_PORT": "4321",
                                 "ROUTER_LOGLEVEL": "debug", "ROUTER_KEY": "k" * 20})
    assert (cfg.overlay_if, cfg.host_if, cfg.router_port) == ("flannel.1", "lo", 4321)
    assert cfg.loglevel == "DEBUG" and cfg.log_level_number == 10
    assert cfg.key == b"k" * 20


def test_flags_override_env(tmp_path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"filekey-0123456789\n")
    env = {"ROUTER_PORT": "4321", "HOST_IF": "eth0", "ROUTER_KEY": "envkey-0123456789"}
    cfg = RouterConfig.from_env(env, flags("--port", "999", "--host-if", "lo",
                                           "--key-file", str(keyfile)))
    assert cfg.router_port == 999 and cfg.host_if == "lo"
    assert cfg.key == b"filekey-0123456789"


@pytest.mark.parametrize("port", ["0", "65536", "-1", "http", "12.5"])
def test_bad_port(port: str) -> None:
    with pytest.raises(ConfigError, match="ROUTER_PORT"):
        RouterConfig.from_env({"ROUTER_PORT": port})


def test_bad_loglevel() -> None:
    with pytest.raises(ConfigError, match="ROUTER_LOGLEVEL.*'LOUD'"):
        RouterConfig.from_env({"ROUTER_LOGLEVEL": "LOUD"})


def test_missing_interface_is_named() -> None:
    env = {"OVERLAY_IF": "lo", "HOST_IF": "nosuchif0", "ROUTER_KEY": "x" * 16}
    cfg = RouterConfig.from_env(env)
    with pytest.raises(ConfigError, match="HOST_IF: interface 'nosuchif0' does not exist"):
        cfg.validate()
    cfg = RouterConfig.from_env({"HOST_IF": "lo", "ROUTER_KEY": "x" * 16})
    with pytest.raises(ConfigError, match="OVERLAY_IF is not set"):
        cfg.validate()


def test_key_checks(tmp_path) -> None:
    base = {"OVERLAY_IF": "lo", "HOST_IF": "lo"}
    with pytest.raises(ConfigError, match="no peer key"):
        RouterConfig.from_env(base).validate()
    with pytest.raises(ConfigError, match="too short"):
        RouterConfig.from_env({**base, "ROUTER_KEY": "short"}).validate()
    with pytest.raises(ConfigError, match=str(tmp_path / "absent")):
        RouterConfig.from_env({**base, "ROUTER_KEY_FILE": str(tmp_path / "absent")})
    assert RouterConfig.from_env({**base, "ROUTER_KEY": "y" * 16}).validate().host_if == "lo"
