"""The Docker files cannot be built here (no Jetson, no docker); check they parse and reference files that exist."""

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def instructions(path):
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.server", "Dockerfile.jetson"])
def test_dockerfile_parses_and_copies_existing_files(name):
    ins = instructions(REPO / "docker" / name)
    assert all(word in INSTRUCTIONS for word, _ in ins), [w for w, _ in ins if w not in INSTRUCTIONS]
    first = [w for w, _ in ins if w != "ARG"][0]
    assert first == "FROM"
    copies = [rest for word, rest in ins if word in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        parts = [p for p in rest.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"{name}: COPY source {src} does not exist (build context = repo root)"
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert entry and entry[0].startswith("[")


def test_jetson_image_is_l4t_r32_7_and_runs_the_agent_folder():
    ins = instructions(REPO / "docker" / "Dockerfile.jetson")
    text = (REPO / "docker" / "Dockerfile.jetson").read_text()
    assert "nvcr.io/nvidia/l4t-tensorrt:r8.2.1-runtime" in text and "pycuda" in text
    copies = {dst.rstrip("/"): src.rstrip("/") for word, rest in ins if word == "COPY" for src, dst in [rest.split()[-2:]]}
    assert copies.get("/opt/redistill/agent") == "deploy/agent", copies
    entry = json.loads([rest for word, rest in ins if word == "ENTRYPOINT"][0])
    # the entry point runs the copied folder itself (its __main__.py), as the deploy does on a device
    assert entry[0] == "python3" and entry[1].rstrip("/") == "/opt/redistill/agent", entry
    assert (REPO / "deploy" / "agent" / "__main__.py").is_file()


def test_deploy_guide_exists_and_is_honest():
    doc = (REPO / "docs" / "deploy.md").read_text()
    for needle in ("JetPack 4.6", "jetson_clocks", "OPENBLAS_CORETYPE=ARMV8", "pycuda", "/usr/local/cuda/bin",
                   "not been run on a device", "docker/Dockerfile.jetson"):
        assert needle in doc, needle
