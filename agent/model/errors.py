"""Errors of the object model: which object was rejected, at which field, and why.

A `ModelError` is a value (it is collected into `LoadResult.errors` and shown to users); a
`PolicyError` is the exception that carries one while an object is being parsed. Field paths use
the API server's notation (`spec.ingress[0].ports[1].endPort`) so a message can be matched
against `kubectl explain` and the API server's own rejections.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelError:
    """One rejected object (or one unreadable document when `kind` is empty)."""

    kind: str
    namespace: str | None
    name: str | None
    field: str
    message: str
    source: str = ""

    @property
    def object_ref(self) -> str:
        """`ns/name` for namespaced objects, `name` for cluster-scoped ones."""
        name = self.name or "<unnamed>"
        return f"{self.namespace}/{name}" if self.namespace else name

    def __str__(self) -> str:
        location = f"{self.field}: " if self.field else ""
        if not self.kind:
            # Not an object we could identify: the file is the best pointer we have.
            where = self.source or "<input>"
            return f"{where}: {location}{self.message}"
        return f"{self.kind} {self.object_ref}: {location}{self.message}"


class PolicyError(ValueError):
    """An object the API server would reject; `error` says which object, which field and why."""

    def __init__(self, error: ModelError) -> None:
        super().__init__(str(error))
        self.error = error
