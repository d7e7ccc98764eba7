"""`make bench`: runs every benchmark module that exists and collects results into bench/out/results.json.

Each module is imported and run on its own: a module that fails to import (a missing tool, a
syntax error) or whose run() raises is recorded as {"error": ...} in results.json and the others
still run. The exit status is 1 if any module failed.

`python -m bench NAME...` runs only the named modules and replaces just their entries in the
existing results.json, each with a note saying when it was measured apart from the full run.

Results are outputs: they go to bench/out/ (not tracked). `--publish` writes the tracked
bench/results.json instead, the snapshot docs/performance.md cites; publish a run only with the
change whose figures it shows.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"  # a run's outputs (.gitignore)
PUBLISHED = HERE / "results.json"  # the figures docs/performance.md cites


def results_file(publish: bool = False) -> Path:
    return PUBLISHED if publish else OUT / "results.json"


def run_module(qualified_name: str) -> tuple[object, bool] | None:
    """(the module's results, True), or ({"error": ..., "stage": ...}, False) if its import or
    its run() failed; None if it has no run() (a helper, not a benchmark)."""
    stage = "import"
    try:
        module = importlib.import_module(qualified_name)
        run = getattr(module, "run", None)
        if run is None:
            return None
        print(f"== {qualified_name}", flush=True)
        stage = "run"
        return run(), True
    except Exception as exc:  # one failing benchmark must not hide the others' figures
        print(f"{qualified_name} failed ({stage}): {exc!r}", file=sys.stderr)
        return {"error": repr(exc), "stage": stage}, False


def main(
    package: str = "bench",
    directory: Path | None = None,
    results_path: Path | None = None,
    only: Sequence[str] = (),
) -> int:
    """Run the modules of `package` (all, or `only` those); results_path defaults to bench/out/."""
    results_path = results_path or results_file()
    directory = directory or Path(__file__).resolve().parent
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}",
    }
    names = [m.name for m in pkgutil.iter_modules([str(directory)]) if not m.name.startswith("_")]
    machine = results["machine"]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            print(f"no benchmark module named {', '.join(unknown)}", file=sys.stderr)
            return 2
        names = list(only)
        if results_path.exists():
            results = json.loads(results_path.read_text())  # date and machine: the full run's
    failed = 0
    for name in sorted(names):
        outcome = run_module(f"{package}.{name}")
        if outcome is None:
            continue
        result, ok = outcome
        failed += not ok
        if only and isinstance(result, dict):
            stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            result["note"] = (
                f"measured by `python -m bench {name}` at {stamp} on {machine}, apart from the full run."
            )
        results[name] = result
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {results_path}")
    return 1 if failed else 0


def cli(argv: Sequence[str]) -> int:
    """`python -m bench [--publish] [NAME...]`"""
    publish = "--publish" in argv
    names = [arg for arg in argv if arg != "--publish"]
    return main(results_path=results_file(publish), only=names)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
