"""Errors that distilsd reports to people.

Library code raises these with a message that says what is wrong and, where there is one,
a hint that says what to do. The CLI prints them as one line and exits non-zero; the HTTP
API maps them to 4xx answers with the same text.
"""

from __future__ import annotations


class DistilSDError(Exception):
    """Base class: an error a user can act on (not a bug in distilsd)."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class InputError(DistilSDError):
    """A value given by the user (flag, file, prompt) is not usable."""


class ModelLoadError(DistilSDError):
    """A model path, hub id or checkpoint could not be loaded as asked."""


class UnsafeCheckpointError(ModelLoadError):
    """A pickled checkpoint was given without an explicit opt-in."""


class MissingDependencyError(DistilSDError):
    """An optional dependency is needed for this feature."""

    def __init__(self, package: str, extra: str, feature: str):
        super().__init__(
            f"{feature} needs the Python package '{package}', which is not installed",
            hint=f"install it with: pip install 'distilsd[{extra}]'",
        )
        self.package = package
        self.extra = extra


class OutputError(DistilSDError):
    """An output location cannot be written, or would overwrite something."""


class RequestError(InputError):
    """An invalid request to the server; ``field`` names the offending field as the client sent it."""

    def __init__(self, field: str, message: str, hint: str | None = None):
        super().__init__(message, hint)
        self.field = field
