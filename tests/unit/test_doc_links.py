"""Every relative link in the repository's Markdown resolves: the file exists, and so does the
heading an `#anchor` names (GitHub's slugs), so moving a section cannot leave a dead link behind."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^(```|~~~)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # https:, mailto:, ...


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores
    kept), each space a hyphen."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in _prose_lines(text):
        match = _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(root: Path) -> list[str]:
    """`file:line: target (why)` for each relative link in a tracked *.md file that does not resolve."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "*.md"],
        cwd=root,
        capture_output=True,
        check=True,
    )
    problems = []
    for name in sorted(set(filter(None, listing.stdout.decode().split("\0")))):
        document = root / name
        if not document.is_file():
            continue  # deleted in the work tree, not yet in the index
        text = document.read_text()
        for number, line in _prose_lines(text):
            for target in _LINK.findall(_CODE_SPAN.sub("", line)):
                if _EXTERNAL.match(target):
                    continue
                path_part, _, anchor = target.partition("#")
                linked = (document.parent / path_part).resolve() if path_part else document
                where = f"{name}:{number}: {target}"
                if not linked.exists():
                    problems.append(f"{where} (no such file)")
                elif root.resolve() not in (linked, *linked.parents):
                    problems.append(f"{where} (outside the repository)")
                elif anchor and (linked.suffix != ".md" or anchor not in anchors(linked.read_text())):
                    problems.append(f"{where} (no heading with that anchor)")
    return problems


def test_every_relative_markdown_link_resolves() -> None:
    assert broken_links(REPO) == []


def test_the_readme_links_every_reference_page() -> None:
    """The README is the way in: each page of docs/ is reachable from it."""
    readme = (REPO / "README.md").read_text()
    linked = {target.partition("#")[0] for target in _LINK.findall(_CODE_SPAN.sub("", readme))}
    pages = {f"docs/{page.name}" for page in (REPO / "docs").glob("*.md")}
    assert pages and pages <= linked


def test_slugs_follow_github() -> None:
    assert slug("`podfence agent` (port 9301)") == "podfence-agent-port-9301"
    assert slug("Set-up (fresh Debian machine, as root)") == "set-up-fresh-debian-machine-as-root"
    assert slug("Why egress is judged at netfilter") == "why-egress-is-judged-at-netfilter"
    assert anchors("# A\n## Notes\n```\n## not a heading\n```\n## Notes\n") == {"a", "notes", "notes-1"}


def test_the_check_finds_a_missing_file_a_missing_anchor_and_a_way_out(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A\n\n## Real heading\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md#real-heading) [ok](#top) [web](https://example.com/x.md)\n"
        "`[code](nowhere.md)`\n```\n[fenced](nowhere.md)\n```\n"
        "[gone](docs/b.md) [anchor](docs/a.md#old-heading) [up](..)\n# Top\n"
    )
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    assert [problem.split(" (")[1] for problem in broken_links(tmp_path)] == [
        "no such file)",
        "no heading with that anchor)",
        "outside the repository)",
    ]
