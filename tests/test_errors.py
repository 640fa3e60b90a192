"""The project's error types: each is a GazemonaiError and the built-in a Python caller expects."""

import pytest

from gazemonai import errors
from gazemonai.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    FixationFormatError,
    GazemonaiError,
    ImageReadError,
    InvalidInputError,
    MissingInputError,
)


@pytest.mark.parametrize(
    "error, builtin",
    [
        (InvalidInputError, ValueError),
        (FixationFormatError, ValueError),
        (CheckpointMismatchError, ValueError),
        (CheckpointReadError, ValueError),
        (MissingInputError, FileNotFoundError),
        (ImageReadError, OSError),
    ],
)
def test_each_error_is_a_project_error_and_its_builtin(error, builtin):
    assert issubclass(error, GazemonaiError) and issubclass(error, builtin)
    with pytest.raises(builtin, match="file x, row 3"):
        raise error("file x, row 3: what is wrong")


def test_the_errors_module_lists_every_type_it_defines():
    defined = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert set(errors.__all__) == defined


def test_the_modules_that_raise_them_re_export_them():
    """``from gazemonai.gaze.fixations import FixationFormatError`` and the like keep working."""
    from gazemonai.gaze import FixationFormatError as from_gaze
    from gazemonai.gaze.fixations import FixationFormatError as from_fixations
    from gazemonai.prep.io import ImageReadError as from_io

    assert from_fixations is from_gaze is FixationFormatError and from_io is ImageReadError
