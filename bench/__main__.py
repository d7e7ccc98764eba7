"""`make bench`: runs every benchmark module that exists and collects results into bench/results.json."""

from __future__ import annotations

import importlib
import json
import pkgutil
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.json"


def main() -> int:
    results: dict[str, object] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}",
    }
    names = [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_")]
    failed = 0
    for name in sorted(names):
        module = importlib.import_module(f"bench.{name}")
        run = getattr(module, "run", None)
        if run is None:
            continue
        print(f"== bench.{name}", flush=True)
        try:
            results[name] = run()
        except Exception as exc:  # one failing benchmark must not hide the others' figures
            failed += 1
            results[name] = {"error": repr(exc)}
            print(f"bench.{name} failed: {exc!r}", file=sys.stderr)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
