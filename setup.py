"""Build hooks: generate the gRPC stubs (agent/api/*_pb2*.py) from proto/, and carry bpf/ in the wheel.

Everything else about the package lives in pyproject.toml. The stubs are gitignored, so a plain
`pip install .` must produce them; build_py does it before it collects the package's modules,
which then include the fresh stubs. The BPF C sources stay in the top-level bpf/ (BCC compiles
them on the node at start); a regular build copies them into the built package, where
agent/dataplane/bpf/loader.py looks when there is no bpf/ beside agent/. An editable install
needs no copy: the loader reads bpf/ in the tree.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BPF_SOURCES = ROOT / "bpf"
PACKAGED_BPF = Path("agent", "dataplane", "bpf", "sources")  # loader.PACKAGED_SOURCE_DIR


class BuildPy(build_py):
    """build_py that first generates the gRPC stubs and, for a wheel, then adds the BPF sources."""

    def run(self) -> None:
        # Loaded by path: importing the `agent` package here would need its runtime dependencies.
        build_script = ROOT / "agent" / "api" / "build.py"
        spec = importlib.util.spec_from_file_location("podfence_api_build", build_script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if module.generate() != 0:
            raise RuntimeError("grpc_tools.protoc failed to generate agent/api stubs")
        super().run()
        if not self.editable_mode:
            self._copy_bpf_sources(Path(self.build_lib) / PACKAGED_BPF)

    def _copy_bpf_sources(self, target: Path) -> None:
        sources = sorted(BPF_SOURCES.rglob("*.[ch]"))
        if not any(path.name == "podfence.c" for path in sources):
            raise RuntimeError(f"no BPF sources under {BPF_SOURCES}: the wheel would not run")
        shutil.rmtree(target, ignore_errors=True)
        for path in sources:
            copy = target / path.relative_to(BPF_SOURCES)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy)


setup(cmdclass={"build_py": BuildPy})
