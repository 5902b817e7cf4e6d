"""Kubernetes integration: pod and node metadata from the API, cgroups and the runtime.

Modules: `cgroup` (pid → pod UID and container ID), `watcher` (list+watch with re-list on
410 and backoff), `pods` (this node's pods: a `PodMetadataSource`), `nodes` (podCIDR → node
InternalIP for peers), `containers` (container labels via crictl), `apiclient` (in-cluster or
kubeconfig), `cluster` (builds all of it for the daemon). For running the chart without a
cluster: `podspec` (a rendered pod spec as `podman run` flags) and `podman` (a stand-in
kubelet: volumes laid out, the container run and probed).
"""
