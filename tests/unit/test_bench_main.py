"""The bench runner isolates each module: a failed import or run is recorded, the others still run."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.__main__ import main

MODULES = {
    "a_broken_import": "import a_module_that_is_not_installed\n\ndef run():\n    return {'never': 1}\n",
    "b_fine": "def run():\n    return {'ratio': 0.9}\n",
    "c_raises": "def run():\n    raise RuntimeError('iperf3 timed out')\n",
    "d_helper": "VALUE = 1\n",
}


@pytest.fixture
def package(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    name = "fakebench_for_runner_test"
    directory = tmp_path / name
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    for module, source in MODULES.items():
        (directory / f"{module}.py").write_text(source)
    sys.path.insert(0, str(tmp_path))
    try:
        yield name, directory
    finally:
        sys.path.remove(str(tmp_path))
        for module in [m for m in sys.modules if m.startswith(name)]:
            del sys.modules[module]


def test_a_failing_import_or_run_is_recorded_and_the_others_still_run(
    package: tuple[str, Path], tmp_path: Path
):
    name, directory = package
    results_path = tmp_path / "results.json"
    assert main(name, directory, results_path) == 1
    results = json.loads(results_path.read_text())
    assert results["b_fine"] == {"ratio": 0.9}
    assert results["a_broken_import"]["stage"] == "import"
    assert "a_module_that_is_not_installed" in results["a_broken_import"]["error"]
    assert results["c_raises"] == {"error": "RuntimeError('iperf3 timed out')", "stage": "run"}
    assert "d_helper" not in results
    assert {"date", "machine"} <= results.keys()


def test_named_modules_replace_only_their_entries(package: tuple[str, Path], tmp_path: Path):
    name, directory = package
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps({"date": "2026-01-01", "b_fine": {"ratio": 0.1}, "other": {"x": 1}}))
    assert main(name, directory, results_path, only=["b_fine"]) == 0
    results = json.loads(results_path.read_text())
    assert results["other"] == {"x": 1}  # untouched, and still from the full run's date
    assert results["date"] == "2026-01-01"
    assert results["b_fine"]["ratio"] == 0.9
    assert "apart from the full run" in results["b_fine"]["note"]
    assert "c_raises" not in results
    assert main(name, directory, results_path, only=["no_such_module"]) == 2
