"""Kubernetes integration: pod and node metadata from the API, cgroups and the runtime.

Modules: `cgroup` (pid → pod UID and container ID), `pods` (watched pod metadata source),
`nodes` (podCIDR → node address for peers), `containers` (container labels via the CRI).
"""
