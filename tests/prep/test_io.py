import os

import numpy as np
import pytest
from PIL import Image

from gazemonai.gaze.fixations import FixationFormatError
from gazemonai.prep.io import (
    ImageReadError,
    read_image,
    read_map_png,
    read_mask,
    resolve_in_folder,
    write_png,
)


def test_resolve_tries_other_extensions_and_stays_inside(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / "a.png")
    assert resolve_in_folder(tmp_path / "imgs", "a.jpg").name == "a.png"  # CSV says .jpg, stored as .png
    with pytest.raises(FileNotFoundError, match="no file for 'b.jpg'"):
        resolve_in_folder(tmp_path / "imgs", "b.jpg")
    with pytest.raises(FixationFormatError, match="outside"):
        resolve_in_folder(tmp_path / "imgs", "..")
    # a link that leaves the folder is refused
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "secret.png")
    os.symlink(tmp_path / "secret.png", tmp_path / "imgs" / "link.png")
    with pytest.raises(ImageReadError, match="outside"):
        resolve_in_folder(tmp_path / "imgs", "link.png")


def test_read_image_modes_and_errors(tmp_path):
    Image.fromarray(np.full((3, 5, 4), 7, np.uint8), "RGBA").save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").shape == (3, 5, 3)
    Image.fromarray(np.full((3, 5), 60000, np.uint16)).save(tmp_path / "g16.png")
    a = read_image(tmp_path / "g16.png")
    assert a.shape == (3, 5) and a.max() == 60000
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(ImageReadError, match="cannot read image .*bad.jpg"):
        read_image(tmp_path / "bad.jpg")
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "none.png")


def test_read_mask_conventions(tmp_path):
    m = np.array([[0, 1], [1, 0]], np.uint8)
    Image.fromarray(m).save(tmp_path / "01.png")
    Image.fromarray(m * 255).save(tmp_path / "0255.png")
    noisy = np.array([[3, 250], [130, 120]], np.uint8)  # JPEG-like noise around 0/255
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "01.png"), m.astype(bool))
    np.testing.assert_array_equal(read_mask(tmp_path / "0255.png"), m.astype(bool))
    np.testing.assert_array_equal(read_mask(tmp_path / "noisy.png"), [[False, True], [True, False]])
    with pytest.raises(ImageReadError, match="is 2x2 but its image is 3x2"):
        read_mask(tmp_path / "01.png", size=(3, 2))


def test_png_round_trips(tmp_path):
    p = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    back = read_map_png(write_png(tmp_path / "m.png", p))
    assert np.abs(back - p).max() <= 0.5 / 65535 + 1e-7
    b = write_png(tmp_path / "sub" / "b.png", p > 0.5)
    assert set(np.unique(np.asarray(Image.open(b)))) == {0, 255}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_folder_held_by_another_process_is_refused_until_that_process_dies(tmp_path):
    """The lock is honoured across processes, and a killed holder (``kill -9``) leaves no stale lock."""
    import signal
    import subprocess
    import sys

    from gazemonai.errors import InvalidInputError
    from gazemonai.prep.io import exclusive_folder

    hold = (
        "import time\nfrom gazemonai.prep.io import exclusive_folder\n"
        f"with exclusive_folder({str(tmp_path)!r}, 'x', '--out'):\n"
        " print('held', flush=True)\n time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InvalidInputError) as refused:
            with exclusive_folder(tmp_path, "`gazemonai pseudo-masks`", "--out"):
                pass
        assert str(refused.value) == (
            f"{tmp_path} is being written by another `gazemonai pseudo-masks` (pid {holder.pid}); "
            "wait for it to finish or give another --out"
        )
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive_folder(tmp_path, "`gazemonai pseudo-masks`", "--out"):  # the kernel let go of it
        assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()}"


def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_kept(tmp_path):
    """``OUT/.lock`` linking elsewhere is not followed: the file it points to was emptied before (#25)."""
    from gazemonai.errors import InvalidInputError
    from gazemonai.prep.io import exclusive_folder

    precious = tmp_path / "notes.txt"
    precious.write_text("a week of notes\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".lock").symlink_to(precious)
    with pytest.raises(InvalidInputError, match=r"^--out .*out: cannot lock .*\.lock"):
        with exclusive_folder(tmp_path / "out", "`gazemonai pseudo-masks`", "--out"):
            pass
    assert precious.read_text() == "a week of notes\n"
