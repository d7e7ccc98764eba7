"""The package build generates the gRPC stubs (setup.py's build_py hook), for both the regular
wheel (`pip install .`) and the editable one (`pip install -e .`, which the Dockerfile uses)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = ("agent/api/podfence_pb2.py", "agent/api/podfence_pb2_grpc.py")


@pytest.fixture
def clean_tree(tmp_path: Path) -> Path:
    """A copy of what the Dockerfile copies, without any previously generated stubs."""
    tree = tmp_path / "src"
    tree.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "proto", tree / "proto")
    shutil.copytree(ROOT / "agent", tree / "agent", ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    assert not any((tree / stub).exists() for stub in STUBS)
    return tree


def _build(tree: Path, hook: str, out: Path) -> Path:
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"],
        cwd=tree, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


def test_a_regular_wheel_contains_the_generated_stubs(clean_tree: Path, tmp_path: Path):
    wheel = _build(clean_tree, "build_wheel", tmp_path / "dist")
    names = set(zipfile.ZipFile(wheel).namelist())
    for stub in STUBS:
        assert stub in names
    grpc_stub = zipfile.ZipFile(wheel).read("agent/api/podfence_pb2_grpc.py").decode()
    assert "from agent.api import podfence_pb2" in grpc_stub


def test_an_editable_build_generates_the_stubs_in_the_tree(clean_tree: Path, tmp_path: Path):
    _build(clean_tree, "build_editable", tmp_path / "dist")
    for stub in STUBS:
        assert (clean_tree / stub).is_file()
