"""Kubernetes API client configuration: in-cluster service account, else a kubeconfig."""

from __future__ import annotations

import os

from kubernetes import client, config


class KubeConfigError(RuntimeError):
    """Neither the in-cluster service account nor a kubeconfig gave a usable configuration."""


def api_client_from_environment(kubeconfig: str | None = None) -> client.ApiClient:
    """An `ApiClient` for the cluster this process runs in.

    In a pod: the service account token and `KUBERNETES_SERVICE_HOST`. Elsewhere: the
    kubeconfig (`kubeconfig`, `$KUBECONFIG`, or `~/.kube/config`). The global default
    configuration of the kubernetes package is left untouched.
    """
    cfg = client.Configuration()
    errors = []
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except config.ConfigException as exc:
            errors.append(f"in-cluster: {exc}")
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    try:
        config.load_kube_config(config_file=path, client_configuration=cfg)
    except (config.ConfigException, OSError) as exc:
        errors.append(f"kubeconfig {path}: {exc}")
        raise KubeConfigError("no Kubernetes API configuration: " + "; ".join(errors)) from None
    return client.ApiClient(cfg)


def api_client_for_host(host: str) -> client.ApiClient:
    """An unauthenticated `ApiClient` for `host` (e.g. `http://127.0.0.1:8001`, kubectl proxy)."""
    cfg = client.Configuration()
    cfg.host = host
    return client.ApiClient(cfg)
