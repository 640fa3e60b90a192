"""Reading and writing the images, masks and maps the pipeline works on, safely and with clear errors.

Every file name that comes from user data (a CSV's ``IMAGE`` column, a split file) is resolved with
:func:`resolve_in_folder`, which refuses path separators, ``..`` and symbolic links that leave the
folder, so a crafted CSV can never make the tools read or write outside the dataset.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout
from PIL import Image, UnidentifiedImageError

from ..errors import FixationFormatError, ImageReadError, InvalidInputError, MissingInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "validate_image_name",
    "resolve_in_folder",
    "read_image",
    "read_mask",
    "write_png",
    "read_map_png",
    "read_ids",
    "exclusive_folder",
]

#: Extensions tried, in this order, when a name's own file is absent (``x.jpg`` may be stored as ``x.png``).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def validate_image_name(name: str, where: str = "") -> str:
    """Check that an image name from user data is a plain file name that cannot leave its folder.

    Args:
        name: the value to check (a CSV's ``IMAGE``, a split file's line).
        where: prefix for the error message (file and row).

    Raises:
        FixationFormatError: when the name is empty, absolute, contains a path separator or is ``..``.
    """
    prefix = f"{where}: " if where else ""
    if not name or not name.strip():
        raise FixationFormatError(f"{prefix}IMAGE is empty")
    parts = re.split(r"[\\/]", name)
    if ".." in parts or name == ".":
        raise FixationFormatError(f"{prefix}IMAGE {name!r} refers outside the dataset folder")
    if len(parts) > 1 or (os.altsep and os.altsep in name) or os.sep in name:
        raise FixationFormatError(
            f"{prefix}IMAGE {name!r} contains a path separator; only file names are allowed"
        )
    if "\x00" in name:
        raise FixationFormatError(f"{prefix}IMAGE {name!r} contains a NUL byte")
    return name


def resolve_in_folder(folder: str | os.PathLike, name: str, extensions=IMAGE_EXTENSIONS) -> Path:
    """Find the file for ``name`` inside ``folder``, never outside it.

    ``name`` is tried as is, then its stem with each of ``extensions``.

    Raises:
        FixationFormatError: ``name`` has a path separator or ``..``.
        MissingInputError: no such file in ``folder`` (the message lists what was tried); a
            ``FileNotFoundError``.
        ImageReadError: the file resolves (through a link) outside ``folder``.
    """
    validate_image_name(name)
    folder = Path(folder)
    stem = os.path.splitext(name)[0]
    candidates = [name] + [stem + ext for ext in extensions if stem + ext != name]
    root = folder.resolve()
    for cand in candidates:
        p = folder / cand
        if p.is_file():
            real = p.resolve()
            if root != real.parent and root not in real.parents:
                raise ImageReadError(f"{p} resolves to {real}, outside {root}")
            return p
    raise MissingInputError(f"no file for {name!r} in {folder} (tried {', '.join(candidates)})")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB, or (H, W) for single-channel files (uint8 or uint16).

    Raises:
        ImageReadError: missing, unreadable or corrupt file, or one whose header claims more pixels
            than PIL's decompression-bomb limit (twice ``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "I;16", "I;16B", "I;16L", "I", "F"):
                a = np.asarray(im)
                if im.mode == "I":
                    a = a.astype(np.int32)
            else:
                a = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise ImageReadError(f"image file not found: {path}") from None
    except Image.DecompressionBombError as e:  # pixels far beyond any real image: refused unread
        raise ImageReadError(f"image {path} is too large to be read safely: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from None
    if a.size == 0:
        raise ImageReadError(f"image {path} is empty")
    return np.ascontiguousarray(a)


def read_mask(path: str | os.PathLike, size: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask as a (H, W) bool array.

    Masks stored as 0/255 (JPEG masks such as Kvasir-SEG's are noisy: threshold > 127) or as
    0/1 label maps (foreground > 0) are both understood; colour masks are converted to grey first.

    Args:
        path: mask file.
        size: expected (H, W), normally the image's.

    Raises:
        ImageReadError: unreadable file, or a size different from ``size``.
    """
    a = read_image(path)
    if a.ndim == 3:
        a = a.max(axis=2)
    m = a > 127 if a.max() > 1 and a.dtype == np.uint8 else a > 0
    if size is not None and tuple(m.shape) != tuple(size):
        raise ImageReadError(f"mask {path} is {m.shape[0]}x{m.shape[1]} but its image is {size[0]}x{size[1]}")
    return m


def write_png(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a 2-D map as PNG: bool -> 0/255 8-bit, float in [0, 1] -> 16-bit, integers as they are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        a = np.rint(np.clip(a, 0.0, 1.0) * 65535.0).astype(np.uint16)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(a).save(tmp, format="PNG")
    os.replace(tmp, path)  # never leave a half-written file where a resumed run would trust it
    return path


def read_map_png(path: str | os.PathLike) -> np.ndarray:
    """Read a map written by :func:`write_png` back to float32 in [0, 1]."""
    a = read_image(path)
    scale = 65535.0 if a.dtype == np.uint16 else 255.0
    return (a.astype(np.float32) / scale).astype(np.float32)


def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids of a split file (one per line, blank lines ignored).

    Raises:
        MissingInputError: the file does not exist.
        InvalidInputError: it is not UTF-8 text (the line is named).
    """
    if not Path(path).is_file():
        raise MissingInputError(f"split file not found: {path}")
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InvalidInputError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from e
    return [line.strip() for line in text.splitlines() if line.strip()]


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, who: str, option: str):
    """Hold ``FOLDER/.lock`` while writing into ``folder``: a second writer stops at once, saying so.

    Two runs writing one folder would interleave their files and records. The lock is ``filelock``'s
    ``FileLock`` (``flock`` on Unix, released by the kernel if the process dies, even by ``kill -9``;
    ``msvcrt.locking`` on Windows); its file holds the owner's pid for the message.

    Args:
        folder: the output folder (it must exist).
        who: what writes, for the message (e.g. "`gazemonai pseudo-masks`").
        option: the setting that chose the folder, for the message (e.g. "--out").

    Raises:
        InvalidInputError: another process holds the folder (the message names it), or ``.lock`` cannot
            be opened there (a symbolic link is never followed).
    """
    path = Path(folder) / ".lock"

    def note_owner(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()}".encode())

    lock = FileLock(path, blocking=False, thread_local=False, on_acquired=note_owner)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = path.read_text(errors="replace").strip()
        except OSError:
            owner = ""
        raise InvalidInputError(
            f"{folder} is being written by another {who} ({owner or 'another process'}); "
            f"wait for it to finish or give another {option}"
        ) from None
    except OSError as e:
        raise InvalidInputError(f"{option} {folder}: cannot lock {path} ({e.strerror or e})") from e
    try:
        yield
    finally:
        lock.release()
