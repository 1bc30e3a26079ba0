"""The project's error hierarchy: every expected failure is one of these, with a message a user can act on."""

import re

ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b[^:]*:")


class FedPeftError(Exception):
    """Base class: the CLI prints the message (no traceback) and exits non-zero."""


class ConfigError(FedPeftError):
    """A configuration key or value is unknown or invalid."""


class DataError(FedPeftError):
    """A dataset is missing, unreadable or does not have the expected columns."""


class ModelError(FedPeftError):
    """A model or adapter cannot be loaded or built."""


class PayloadError(FedPeftError):
    """A payload received over the network failed validation; the update is dropped."""


class PrivacyError(FedPeftError):
    """A privacy setting is impossible (e.g. an unreachable epsilon target)."""


class SplitError(FedPeftError):
    """A split-learning session failed: mismatched model/cut, malformed frame, or a lost server."""


class CheckpointError(FedPeftError):
    """A checkpoint is missing, incomplete, corrupt or inconsistent with the run: a resume refuses it."""


def error_line(text: str, limit: int = 300) -> str:
    """A failure in one line: the last ``SomeError: message`` line of a log or traceback (Flower passes on a
    ClientApp's whole traceback), else its last line, cut to ``limit`` characters."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return "no reason given"
    errors = [ln for ln in lines if ERROR_LINE.match(ln)]
    line = errors[-1] if errors else lines[-1]
    return line if len(line) <= limit else line[:limit] + " ..."
