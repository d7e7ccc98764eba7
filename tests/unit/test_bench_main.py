"""The bench runner isolates each module: a failed import or run is recorded, the others still run."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import bench.__main__ as runner
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


def test_results_are_outputs_under_bench_out_unless_published(
    package: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    name, directory = package
    assert runner.results_file() == Path(runner.__file__).parent / "out" / "results.json"
    assert runner.results_file(publish=True) == Path(runner.__file__).parent / "results.json"
    out, published = tmp_path / "out", tmp_path / "published.json"
    published.write_text('{"date": "2026-01-01"}\n')
    monkeypatch.setattr(runner, "OUT", out)
    monkeypatch.setattr(runner, "PUBLISHED", published)

    def run_package(results_path: Path | None = None, only: list[str] | tuple[str, ...] = ()) -> int:
        return main(name, directory, results_path, only)

    monkeypatch.setattr(runner, "main", run_package)
    assert runner.cli(["b_fine"]) == 0  # the default: a new file under out/, the snapshot untouched
    assert json.loads((out / "results.json").read_text())["b_fine"]["ratio"] == 0.9
    assert published.read_text() == '{"date": "2026-01-01"}\n'
    assert main(name, directory, only=["b_fine"]) == 0  # main() alone writes there too
    assert runner.cli(["--publish", "b_fine"]) == 0  # only --publish replaces the snapshot
    assert json.loads(published.read_text())["b_fine"]["ratio"] == 0.9
    assert json.loads(published.read_text())["date"] == "2026-01-01"


def test_report_renders_the_run_under_out_by_default_and_the_snapshot_with_publish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from bench import report

    monkeypatch.setattr(report, "HERE", tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text('{"date": "run", "machine": "m"}')
    (tmp_path / "results.json").write_text('{"date": "published", "machine": "m"}')
    assert report.main([]) == 0
    assert "Date: run." in (tmp_path / "out" / "RESULTS.md").read_text()
    assert not (tmp_path / "RESULTS.md").exists()
    assert report.main(["--publish"]) == 0
    assert "Date: published." in (tmp_path / "RESULTS.md").read_text()
