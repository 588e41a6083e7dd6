"""User-facing errors: one line that names the problem and the file, never a traceback."""

from __future__ import annotations


class LlavaqError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints ``str(error)`` as a single line and exits with ``exit_code``.
    """

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = " ".join(str(message).split())
        self.hint = hint
        super().__init__(self.message)


class ModelError(LlavaqError):
    """The model directory is missing, malformed or not a supported LLaVA checkpoint."""


class ImageError(LlavaqError):
    """The calibration/evaluation images cannot be used."""


class OutputError(LlavaqError):
    """The save directory cannot be written."""


class CacheError(LlavaqError):
    """The session cache is missing, corrupt or belongs to another model/recipe."""


class VerificationFailed(LlavaqError):
    """``verify`` measured a fidelity below the requested threshold."""

    exit_code = 1


class Interrupted(LlavaqError):
    """The user pressed Ctrl-C; the cache is resumable."""

    exit_code = 130
