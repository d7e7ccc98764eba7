"""The repository stands alone: no code, test, bench or script names a path outside the checkout.

A fresh clone with nothing beside it must run every tier. Two ways a file used to reach out: a
literal path (the upstream conformance cases read from a sibling folder of the checkout, design
notes cited from a file that exists only on the development machine), and a `Path(__file__)`
walked up past the repository root. Both are checked here, in every tracked file under the
folders below and in the build files.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("agent", "tests", "bench", "scripts", "pyproject.toml", "Makefile", "setup.py")

# Assembled from pieces so that this file does not match its own patterns.
_SHARED = "sha" + "red"
_OUTSIDE_LITERALS = (
    (r"\.\./+" + _SHARED, "a sibling folder of the checkout"),
    (r"""["']""" + _SHARED + r"""["']""", "a folder named shared (the sibling of the checkout)"),
    (r"(?<![\w.])/" + "work" + r"/", "the development machine's work tree"),
    (r"(?<![\w.])/" + "home" + r"/", "a home directory"),
    (r"\b" + "DESIGN" + r"\.md\b", "design notes outside the repository (they are docs/design.md)"),
)

# NAME = Path(__file__)[.resolve()] followed by .parent... or .parents[N]
_FILE_ANCHOR = re.compile(r"Path\(__file__\)(?:\.resolve\(\))?((?:\.parent\b)*)(?:\.parents\[(\d+)\])?")
_ASSIGNED_ANCHOR = re.compile(
    r"^\s*([A-Za-z_]\w*)\s*(?::[^=]+)?=\s*" + _FILE_ANCHOR.pattern, re.MULTILINE
)


def _tracked_files(root: Path) -> list[Path]:
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *SCANNED],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [root / name for name in listing.split("\0") if name and (root / name).is_file()]


def _levels_up(parents: str, index: str | None) -> int:
    """How many folders above the file's own folder an anchor ends (0: the file's folder)."""
    chain = parents.count(".parent")
    if index is not None:
        return chain + int(index)
    return chain - 1 if chain else -1  # Path(__file__) alone is the file, .parent its folder


def climbs_out(path: Path, text: str, root: Path) -> list[str]:
    """Every `Path(__file__)` walk in a Python file that ends above the repository root."""
    depth = len(path.relative_to(root).parts) - 1  # folders between the root and the file
    found = []
    anchors = {m.group(1): _levels_up(m.group(2), m.group(3)) for m in _ASSIGNED_ANCHOR.finditer(text)}
    for match in _FILE_ANCHOR.finditer(text):
        if _levels_up(match.group(1), match.group(2)) > depth:
            found.append(match.group(0))
    for name, level in anchors.items():
        for match in re.finditer(r"\b" + name + r"((?:\.parent\b)+)|\b" + name + r"\.parents\[(\d+)\]", text):
            more = match.group(1).count(".parent") if match.group(1) else int(match.group(2)) + 1
            if level + more > depth:
                found.append(match.group(0))
    return found


def outside_paths(root: Path) -> list[str]:
    """`file:line: text (why)` for every reference to a path outside the checkout at `root`."""
    literals = [(re.compile(pattern), why) for pattern, why in _OUTSIDE_LITERALS]
    checkout = re.compile(re.escape(str(root.resolve())) + r"\b")
    problems = []
    for path in _tracked_files(root):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        relative = path.relative_to(root)
        for number, line in enumerate(text.splitlines(), 1):
            for pattern, why in [*literals, (checkout, "this checkout's absolute path")]:
                if pattern.search(line):
                    problems.append(f"{relative}:{number}: {line.strip()} ({why})")
        if path.suffix == ".py":
            walks = climbs_out(path, text, root)
            problems += [f"{relative}: {walk} (walks above the repository root)" for walk in walks]
    return problems


def test_nothing_names_a_path_outside_the_repository() -> None:
    assert outside_paths(REPO) == []


@pytest.mark.parametrize(
    ("relative", "line"),
    [
        ("tests/conftest.py", "SHARED = TESTS.parent.parent / " + repr(_SHARED)),
        ("tests/model.py", "CASES = " + repr("/" + "work/" + _SHARED + "/cases.json")),
        ("bench/run.py", "DATA = Path(__file__).resolve().parents[2] / 'data'"),
        ("agent/x/y.py", "HERE = Path(__file__).resolve().parent\nROOT = HERE.parent.parent.parent"),
        ("agent/x/z.py", "here = Path(__file__).resolve().parent\nroot = here.parents[2]"),
        ("scripts/setup.sh", "cp ../" + _SHARED + "/x ."),
        ("pyproject.toml", "# the kernel features in " + "DESIGN" + ".md"),
    ],
)
def test_the_check_finds_each_kind_of_outside_path(tmp_path: Path, relative: str, line: str) -> None:
    """The check itself can fail: each kind of reference, planted in a scratch repository."""
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / relative).write_text(line + "\n")
    (tmp_path / "agent").mkdir(exist_ok=True)
    (tmp_path / "agent" / "fine.py").write_text("ROOT = Path(__file__).resolve().parents[1]\n")
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    problems = outside_paths(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(relative), problems


def test_the_check_finds_this_checkouts_absolute_path(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "a.py").write_text(f"OUT = {str(tmp_path.resolve() / 'out')!r}\n")
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    assert [p.split(":")[0] for p in outside_paths(tmp_path)] == ["bench/a.py"]
