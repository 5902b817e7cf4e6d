# syntax=docker/dockerfile:1
# The ebpf-router image: the Python packages of this repository and crictl, nothing else.
# No BCC, no clang, no kernel headers: programs are assembled in Python and struct layouts
# come from the node's BTF (/sys/kernel/btf/vmlinux, mounted by the chart).
#
#   docker build -t ebpf-router:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/ebpf-router:0.1.0 --push .

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
FROM ${PYTHON_IMAGE} AS crictl
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG CRICTL_VERSION=v1.31.1
ARG TARGETARCH=amd64
ADD https://github.com/kubernetes-sigs/cri-tools/releases/download/${CRICTL_VERSION}/crictl-${CRICTL_VERSION}-linux-${TARGETARCH}.tar.gz /tmp/crictl.tar.gz
ADD https://github.com/kubernetes-sigs/cri-tools/releases/download/${CRICTL_VERSION}/crictl-${CRICTL_VERSION}-linux-${TARGETARCH}.tar.gz.sha256 /tmp/crictl.tar.gz.sha256
RUN echo "$(cut -d' ' -f1 /tmp/crictl.tar.gz.sha256)  /tmp/crictl.tar.gz" | sha256sum -c - \
 && tar -xzf /tmp/crictl.tar.gz -C /usr/local/bin crictl \
 && /usr/local/bin/crictl --version

# -- the runtime image --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/ebpf_router-*.whl
COPY --from=crictl /usr/local/bin/crictl /usr/local/bin/crictl
# The chart mounts the root filesystem read-only: nothing may write bytecode caches at run time.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Runs as root, on purpose. The router
#  - calls bpf(2) and perf_event_open(2) to load and attach its tracepoint programs and read
#    their buffers (CAP_BPF, CAP_PERFMON; CAP_SYS_ADMIN on kernels before 5.8);
#  - seizes (ptrace) processes of other users in other pods, injects syscalls into them and
#    copies their sockets with pidfd_getfd(2) (CAP_SYS_PTRACE);
#  - enters pods' network namespaces with setns(2) to create hand-off sockets (CAP_SYS_ADMIN)
#    and sets options on host-network sockets (CAP_NET_ADMIN).
# Kubernetes can grant those capabilities only to uid 0: for any other uid, execve() leaves
# the effective set empty (a pod spec has no ambient capabilities). The chart drops every
# other capability, and mounts the root filesystem read-only.
# hadolint ignore=DL3002
USER 0:0
ENTRYPOINT ["ebpf-router", "run"]
