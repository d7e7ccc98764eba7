"""The README's settings and metrics tables, read back so tests can hold them against the code.

Settings: under `## Settings`, each ### `podfence ...` heading is followed by one table of
flag | environment | default | meaning. Metrics: under `## Metrics`, one table per process
(### `podfence agent`, ### `podfence control`) of metric | type | labels | meaning.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

README = Path(__file__).resolve().parents[1] / "README.md"

_HEADING_COMMAND = re.compile(r"`podfence\s*([^`]*)`")
_BACKTICKED = re.compile(r"`([^`]+)`")


def section_tables(section: str, text: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Under `## {section}`: the first table after each ### heading naming `podfence X`, keyed
    by X ("" for bare `podfence`), as rows {lower-cased column header: cell text}."""
    lines = (README.read_text() if text is None else text).splitlines()
    tables: dict[str, list[dict[str, str]]] = {}
    in_section = False
    command: str | None = None
    header: list[str] | None = None
    for line in lines:
        if line.startswith("## "):
            in_section = line[3:].strip() == section
            command = None
            continue
        if not in_section:
            continue
        if line.startswith("### "):
            match = _HEADING_COMMAND.search(line)
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
    """Process ("agent", "control") -> the metrics its README table lists."""
    return {
        process: [
            DocumentedMetric(backticked(row["metric"])[0], row["type"], frozenset(backticked(row["labels"])))
            for row in rows
        ]
        for process, rows in section_tables("Metrics", text).items()
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
