"""The project's own error types: what a user's input or settings did wrong, as opposed to a bug.

Everything gazemonai raises about its *input* (a file, a row, a setting, a checkpoint) is a
:class:`GazemonaiError`, with a message that names the file, row or setting and what is wrong. The
command line turns exactly these into one line on stderr and exit status 2; any other exception is
a bug or an environment problem and keeps its traceback. Each type also derives from the built-in
exception a Python caller would expect (``ValueError``, ``FileNotFoundError``, ``OSError``), so
``except ValueError`` keeps working.

This module imports nothing of the package: every sub-package may raise these.
"""

from __future__ import annotations

__all__ = [
    "GazemonaiError",
    "InvalidInputError",
    "FixationFormatError",
    "MissingInputError",
    "ImageReadError",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "TrackingUnavailableError",
]


class GazemonaiError(Exception):
    """Base of the errors about a user's input or settings (exit status 2 on the command line)."""


class InvalidInputError(GazemonaiError, ValueError):
    """A setting or a value of the input data that is not acceptable; the message says which and why."""


class FixationFormatError(InvalidInputError):
    """A fixation CSV that does not follow the schema; the message names file, row and problem."""


class MissingInputError(GazemonaiError, FileNotFoundError):
    """An input file or folder that does not exist; the message names it (and what was tried)."""


class ImageReadError(GazemonaiError, OSError):
    """An image or mask file that is missing, unreadable or corrupt; the message names the file."""


class CheckpointMismatchError(InvalidInputError):
    """A checkpoint whose weights do not fit the network its configs build (widths, levels, channels)."""


class CheckpointReadError(InvalidInputError):
    """A checkpoint file that is not a torch checkpoint of plain weights (corrupt, or holding code)."""


class TrackingUnavailableError(GazemonaiError, ConnectionError):
    """The MLflow tracking server (or store) cannot be reached; the message names its URI."""
