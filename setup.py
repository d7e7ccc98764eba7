"""Build hook: generate the gRPC stubs (agent/api/*_pb2*.py) from proto/ before packaging.

Everything else about the package lives in pyproject.toml. The stubs are gitignored, so a plain
`pip install .` (the container image) must produce them; build_py does it before it collects
the package's modules, which then include the fresh stubs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithStubs(build_py):
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


setup(cmdclass={"build_py": BuildPyWithStubs})
