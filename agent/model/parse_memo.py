"""The objects parsed from one file's last text, reused for the documents that come back unchanged.

A folder source re-reads a whole file when any of it changes: one policy edited in a file of
10,000 took ~1 s of the control service's CPU to parse them all again (issue 27). With a memo, a
document whose JSON spelling is the same as in the last read gets the object parsed then, and
only the changed documents are parsed: reading is C-level decoding plus work proportional to the
change.

Only documents of a JSON text are kept. Their keys are always strings, so `json.dumps` spells two
documents alike exactly when they are the same JSON (true, 1 and 1.0 stay apart, where Python's
== would join them); a YAML document may hold keys of other types that the same spelling would
confuse. Only documents that parsed are kept: an error names where it was found, so a bad
document is parsed (and reported) at every read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from agent.model.objects import KubeObject


@dataclass
class ParseMemo:
    """Parsed objects (or None for ignored kinds) by the JSON spelling of their document, with the
    list entries each one used of the text's budget. Holds the documents of the last read only."""

    _last: dict[str, tuple[KubeObject | None, int]] = field(default_factory=dict)
    _now: dict[str, tuple[KubeObject | None, int]] = field(default_factory=dict)
    hits: int = 0  # documents of the last read taken from the memo (tests read it)

    def begin(self) -> None:
        self._now = {}
        self.hits = 0

    def end(self) -> None:
        """What this read saw becomes the memory: documents gone from the file are forgotten."""
        self._last, self._now = self._now, {}

    @staticmethod
    def spelling(doc: object) -> str | None:
        try:
            return json.dumps(doc, ensure_ascii=False, check_circular=False)
        except (TypeError, ValueError):
            return None

    def lookup(self, spelling: str) -> tuple[KubeObject | None, int] | None:
        found = self._last.get(spelling) or self._now.get(spelling)
        if found is not None:
            self.hits += 1
        return found

    def remember(self, spelling: str, obj: KubeObject | None, used: int) -> None:
        self._now[spelling] = (obj, used)
