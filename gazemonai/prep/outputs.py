"""Where a command may write, checked before it does any work: one check shared by every command.

A command that reads for minutes and then cannot write (or writes over what it read) loses the
user's time or data. :func:`check_output` refuses, naming the option, the path and the reason:

- a path whose format cannot hold the result (a 3-D mask volume given a ``.png`` name, which ITK
  writes as one slice; an extension no writer knows, which fails only after all the work);
- a path that *is* one of the command's inputs, or would write over one (symbolic links resolved,
  hard links compared by inode): ``--out`` equal to ``--volume``, to the image folder, ...;
- a file where a folder is needed (or the other way round), or a folder that is not writable.

It creates nothing; the command makes its folders once it has read its inputs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from ..errors import InvalidInputError

__all__ = ["VOLUME_SUFFIXES", "check_output", "same_path"]

#: file names ITK writes a 3-D mask volume to with its geometry (what ``segment-volume`` accepts)
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def _flag(name: str) -> str:
    return name if name.startswith("-") or " " in name else "--" + name.replace("_", "-")


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file or folder (symbolic links resolved; hard links too)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it, symbolic links resolved."""
    return same_path(a, b) or a.resolve().is_relative_to(b.resolve())


def check_output(
    name: str,
    path: str | os.PathLike,
    folder: bool = False,
    inputs: Mapping[str, str | os.PathLike | None] | None = None,
    writes: Iterable[str] = (),
    suffixes: Iterable[str] | None = None,
) -> Path:
    """Refuse an output ``path`` the command could not write, or would write over one of its inputs.

    Args:
        name: the option that gave it (``out``), for the message.
        path: the output file, or folder when ``folder``.
        folder: whether the output is a folder (the command writes files into it).
        inputs: option -> path of what the command reads (files or folders; ``None`` skipped). The
            output may not be any of them, and none may lie where the command writes.
        writes: for a folder, the names the command writes inside it (files, or folders it fills),
            checked against ``inputs`` too.
        suffixes: the file name endings the result can be written as (lower case), e.g.
            :data:`VOLUME_SUFFIXES`.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        InvalidInputError: naming the option, the path and what is wrong.
    """
    flag, path = _flag(name), Path(os.fspath(path))
    if suffixes is not None:
        suffixes = tuple(suffixes)
        if not path.name.lower().endswith(suffixes):
            raise InvalidInputError(
                f"{flag} {path}: the result cannot be written as "
                f"{path.suffix or 'a file without extension'}; "
                f"give a name ending in {', '.join(suffixes)}"
            )
    if folder and path.exists() and not path.is_dir():
        raise InvalidInputError(f"{flag} {path} is a file, not a folder")
    if not folder and path.is_dir():
        raise InvalidInputError(f"{flag} {path} is a folder; give a file name inside it")
    targets = [path] + ([path / w for w in writes] if folder else [])
    for option, given in (inputs or {}).items():
        if given is None:
            continue
        given = Path(os.fspath(given))
        if same_path(path, given):
            what, other = ("folder" if given.is_dir() else "file"), ("folder" if folder else "file")
            raise InvalidInputError(
                f"{flag} {path} is the {_flag(option)} {what} it reads; give another {other}"
            )
        if not folder and path.exists() and given.is_dir() and _inside(path, given):
            raise InvalidInputError(
                f"{flag} {path} would overwrite a file of the {_flag(option)} folder {given}; "
                "give another file"
            )
        for target in targets[1:]:
            if _inside(given, target):
                raise InvalidInputError(
                    f"{flag} {path}: writing {target.name} there would overwrite "
                    f"the {_flag(option)} {given}; give another folder"
                )
    start = path if folder else path.absolute().parent
    existing = next(p for p in (start, *start.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InvalidInputError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInputError(f"{flag} {path}: {existing} is not writable")
    if not folder and path.exists() and not os.access(path, os.W_OK):
        raise InvalidInputError(f"{flag} {path}: the file is not writable")
    return path
