"""Fixtures shared by the router's kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def netns_name(unique_name: str) -> Iterator[str]:
    """A fresh network namespace with loopback up, removed afterwards (even on failure)."""
    from pyroute2 import NetNS, netns

    netns.create(unique_name)
    try:
        with NetNS(unique_name) as ns:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
        yield unique_name
    finally:
        netns.remove(unique_name)
