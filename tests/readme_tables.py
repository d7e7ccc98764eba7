"""The settings and metrics tables of docs/, read back so tests can hold them against the code.

Settings (docs/settings.md): each level-2 heading naming `podfence ...` is followed by one table of
flag | environment | default | meaning. Metrics (docs/metrics.md): one table per process
(headings `podfence agent`, `podfence control`) of metric | type | labels | meaning. The README
only links to these pages; the module keeps its name so its history stays in one place.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

DOCS = Path(__file__).resolve().parents[1] / "docs"
SETTINGS_DOC = DOCS / "settings.md"
METRICS_DOC = DOCS / "metrics.md"

_HEADING_COMMAND = re.compile(r"`podfence\s*([^`]*)`")
_BACKTICKED = re.compile(r"`([^`]+)`")


def command_tables(document: Path, text: str | None = None) -> dict[str, list[dict[str, str]]]:
    """The first table after each `## ` heading of `document` that names `podfence X`, keyed by X
    ("" for bare `podfence`), as rows {lower-cased column header: cell text}. `text` stands in for
    the file's content (tests of the reader itself)."""
    lines = (document.read_text() if text is None else text).splitlines()
    tables: dict[str, list[dict[str, str]]] = {}
    command: str | None = None
    header: list[str] | None = None
    for line in lines:
        if line.startswith("#"):
            match = _HEADING_COMMAND.search(line) if line.startswith("## ") else None
            command = match.group(1).strip() if match else None
            header = None
            continue
        if command is None:
            continue
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = [cell.lower() for cell in cells]
            elif not all(set(cell) <= {"-", ":"} for cell in cells):
                tables.setdefault(command, []).append(dict(zip(header, cells, strict=True)))
        elif header is not None and command in tables:
            command = None  # the first table under this heading is over
    return tables


def settings_tables(text: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Command ("" for bare `podfence`, "agent", "lab up", ...) -> its rows in docs/settings.md."""
    return command_tables(SETTINGS_DOC, text)


def metrics_tables(text: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Process ("agent", "control") -> its rows in docs/metrics.md."""
    return command_tables(METRICS_DOC, text)


def backticked(cell: str) -> list[str]:
    return _BACKTICKED.findall(cell)


@dataclass(frozen=True)
class DocumentedMetric:
    name: str  # as scraped: counters end in _total
    type: str  # counter | gauge | histogram
    labels: frozenset[str]

    @property
    def family(self) -> str:
        """The family name a Prometheus parser reports (a counter's without _total)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name


def documented_metrics(text: str | None = None) -> dict[str, list[DocumentedMetric]]:
    """Process ("agent", "control") -> the metrics its table in docs/metrics.md lists."""
    return {
        process: [
            DocumentedMetric(backticked(row["metric"])[0], row["type"], frozenset(backticked(row["labels"])))
            for row in rows
        ]
        for process, rows in metrics_tables(text).items()
    }


def exposition_problems(documented: list[DocumentedMetric], exposition: str) -> list[str]:
    """What in `documented` the scraped `exposition` lacks or contradicts: a missing family, another
    type, or a sample whose label names differ from the documented ones. Empty when all hold."""
    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    problems = []
    for metric in documented:
        family = families.get(metric.family)
        if family is None:
            problems.append(f"{metric.name}: not exposed")
            continue
        if family.type != metric.type:
            problems.append(f"{metric.name}: exposed as a {family.type}, documented as a {metric.type}")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = set(sample.labels) - ({"le"} if sample.name.endswith("_bucket") else set())
            if labels != metric.labels:
                problems.append(f"{metric.name}: sample {sample.name} has labels {sorted(labels)}")
                break
    return problems


def exposed_families(exposition: str, prefix: str = "podfence_") -> set[str]:
    """Family names in a scrape that start with `prefix`. The text format gives client_python's
    `<family>_created` stamps no TYPE line, so the parser reports them as families of their own."""
    names = {f.name for f in text_string_to_metric_families(exposition) if f.name.startswith(prefix)}
    stamps = {name for name in names if name.endswith("_created") and name.removesuffix("_created") in names}
    return names - stamps
