"""What goes wrong with a checkpoint or the names of its model, data and loss: one error type, one message form."""
from __future__ import annotations

__all__ = ["CheckpointError", "UnsafeCheckpointError", "first_line"]


class CheckpointError(ValueError):
    """A checkpoint (or the inputs naming it) cannot be used; the message says why and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint holds pickled Python objects and ``trust_checkpoints`` was not given."""


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."
