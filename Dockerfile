# syntax=docker/dockerfile:1
# The ebpf-router image: the Python packages of this repository and crictl, nothing else.
# No BCC, no clang, no kernel headers: programs are assembled in Python and struct layouts
# come from the node's BTF (/sys/kernel/btf/vmlinux, mounted by the chart).
#
#   docker build -t ebpf-router:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/ebpf-router:0.1.0 --push .
#   scripts/build-image          # podman; makes the base with debootstrap when no registry answers

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- wheels of the project and its (pure-Python) dependencies ---------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bpf_asm ./bpf_asm
COPY injector ./injector
COPY ebpfrouter ./ebpfrouter
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- crictl, for containerLabel rules (talks to the node's CRI socket) ------------------------
# Debian carries no crictl, so the upstream release tarball is fetched and checked against its
# digest pinned here (the published crictl-VERSION-linux-ARCH.tar.gz.sha256 values; a new
# version needs both digests replaced). CRICTL_VERSION=none builds an image without crictl,
# for builders that cannot reach the release (containerLabel rules then cannot be used).
FROM ${PYTHON_IMAGE} AS crictl
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG CRICTL_VERSION=v1.31.1
ARG CRICTL_SHA256_AMD64=0a03ba6b1e4c253d63627f8d210b2ea07675a8712587e697657b236d06d7d231
ARG CRICTL_SHA256_ARM64=cd70f9b2f75c9619f40450d4b6e2c74aaab619917da517eff6787b442f8b0e56
ARG TARGETARCH=amd64
RUN mkdir /out && if [ "${CRICTL_VERSION}" = none ]; then exit 0; fi \
 && case "${TARGETARCH}" in \
      amd64) sum="${CRICTL_SHA256_AMD64}" ;; \
      arm64) sum="${CRICTL_SHA256_ARM64}" ;; \
      *) echo "no pinned crictl digest for ${TARGETARCH}" >&2; exit 1 ;; \
    esac \
 && url="https://github.com/kubernetes-sigs/cri-tools/releases/download/${CRICTL_VERSION}/crictl-${CRICTL_VERSION}-linux-${TARGETARCH}.tar.gz" \
 && python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$url" /tmp/crictl.tar.gz \
 && echo "${sum}  /tmp/crictl.tar.gz" | sha256sum -c - \
 && tar -xzf /tmp/crictl.tar.gz -C /out crictl \
 && /out/crictl --version

# -- the runtime image --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/ebpf_router-*.whl
COPY --from=crictl /out/ /usr/local/bin/
# What the image is (OCI annotations); scripts/build-image passes the commit it was built from.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/ebpf-router/ebpf-router
ARG CRICTL_VERSION=v1.31.1
LABEL org.opencontainers.image.title="ebpf-router" \
      org.opencontainers.image.description="Bypass container overlay networks with eBPF and ptrace" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.github.ebpf-router.crictl="${CRICTL_VERSION}"
# The chart mounts the root filesystem read-only: nothing may write bytecode caches at run time.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Runs as root, on purpose. The router
#  - calls bpf(2) and perf_event_open(2) to load and attach its tracepoint programs
#    (CAP_BPF, CAP_PERFMON, dropped once they are attached; kernels before 5.8 need the
#    chart's `securityContext.privileged`);
#  - seizes (ptrace) processes of other users in other pods, injects syscalls into them and
#    copies their sockets with pidfd_getfd(2) (CAP_SYS_PTRACE), listing their fds
#    (CAP_DAC_READ_SEARCH);
#  - enters pods' network namespaces with setns(2) to create hand-off sockets (CAP_SYS_ADMIN)
#    and may bind host listeners below port 1024 (CAP_NET_BIND_SERVICE).
# ebpfrouter/privileges.py CAPABILITIES is the one list; docs/kubernetes.md explains each.
# Kubernetes can grant those capabilities only to uid 0: for any other uid, execve() leaves
# the effective set empty (a pod spec has no ambient capabilities). The chart drops every
# other capability, and mounts the root filesystem read-only.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["ebpf-router", "run"]
