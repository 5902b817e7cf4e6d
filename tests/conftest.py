"""Shared test fixtures: root checks and run-unique names so parallel runs never collide."""

from __future__ import annotations

import os
import uuid

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `root` when not running as root (CI always runs as root)."""
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root and the real kernel")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def unique_name() -> str:
    """A short name unique to this test run (fits IFNAMSIZ and BPF_OBJ_NAME_LEN)."""
    return "t" + uuid.uuid4().hex[:8]
