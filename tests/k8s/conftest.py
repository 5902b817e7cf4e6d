"""Fixtures for the Kubernetes tests: a real helm binary and the chart's location."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ebpf-router"
GET_HELM = ROOT / "charts" / "tools" / "get-helm.py"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # apiserver_standin


def _load_get_helm():
    spec = importlib.util.spec_from_file_location("get_helm", GET_HELM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of a real helm binary (EBPF_ROUTER_HELM, or extracted by charts/tools/get-helm.py).

    Skips, with the reason, only when helm cannot be obtained.
    """
    given = os.environ.get("EBPF_ROUTER_HELM")
    if given:
        return given
    get_helm = _load_get_helm()
    try:
        return str(get_helm.get_helm())
    except get_helm.HelmUnavailable as exc:
        pytest.skip(f"no helm binary: {exc}")


@pytest.fixture(scope="session")
def chart() -> Path:
    """The chart directory."""
    return CHART


@pytest.fixture
def standin():
    """A running stand-in API server (tests/k8s/apiserver_standin.py), stopped afterwards."""
    from apiserver_standin import StandInApiServer

    server = StandInApiServer().start()
    yield server
    server.stop()


@pytest.fixture
def core_api(standin):
    """The real kubernetes client's CoreV1Api, pointed at the stand-in."""
    from kubernetes import client

    from ebpfrouter.k8s.apiclient import api_client_for_host

    api_client = api_client_for_host(standin.url)
    yield client.CoreV1Api(api_client)
    api_client.close()

