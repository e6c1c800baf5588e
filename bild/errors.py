"""The one exception type bild raises for bad input; the CLI prints it on one line."""

from __future__ import annotations


class BildError(ValueError):
    """Invalid input or configuration, explained in one line.

    field: the setting or input it concerns (a GenerationConfig field, "prompt", ...), or None; the server
    reports it as the request field at fault."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
