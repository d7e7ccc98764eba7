"""The package build (setup.py's build_py hook): it generates the gRPC stubs, for both the regular
wheel (`pip install .`) and the editable one (`pip install -e .`, which the Dockerfile uses), and a
regular wheel carries the BPF C sources, so an install without the source tree can compile them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent.dataplane.bpf import loader

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
    shutil.copytree(ROOT / "bpf", tree / "bpf")
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
    # bpf/ stays where it is: the loader reads it in the tree, and no copy lands under agent/.
    assert not (clean_tree / "agent" / "dataplane" / "bpf" / loader.PACKAGED_SOURCE_DIR).exists()


def test_a_regular_wheel_carries_the_bpf_sources_and_the_loader_finds_them(clean_tree: Path, tmp_path: Path):
    wheel = _build(clean_tree, "build_wheel", tmp_path / "dist")
    packaged = f"agent/dataplane/bpf/{loader.PACKAGED_SOURCE_DIR}"
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{packaged}/{p.relative_to(ROOT / 'bpf')}" for p in (ROOT / "bpf").rglob("*.[ch]")}
    assert f"{packaged}/podfence.c" in expected and f"{packaged}/lib/parse.h" in expected
    assert expected == {name for name in names if name.startswith(packaged + "/")}
    # Installed, with no bpf/ anywhere near it: a wheel install is the wheel unpacked into a folder
    # on sys.path. The loader must find the packaged copy and inline every #include from it.
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]); from agent.dataplane.bpf import loader;"
        "text = loader.program_text();"
        "print(loader.__file__, loader.BPF_SOURCE_DIR, len(text), '#include \"' in text, sep='\\n')"
    )
    argv = [sys.executable, "-I", "-c", probe, str(site)]
    done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    module, source_dir, length, unresolved = done.stdout.split()
    assert Path(module).is_relative_to(site)
    assert Path(source_dir) == site / packaged
    assert int(length) > (ROOT / "bpf" / "podfence.c").stat().st_size and unresolved == "False"
