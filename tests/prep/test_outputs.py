"""Outputs that would destroy an input or lie about themselves are refused before any work.

Each case runs a ``gazemonai`` command as a user does and checks three things: exit status 2 with
one line naming ``--out`` and the reason, and every input file still as it was.
"""

import os
import shutil

import numpy as np
import pytest
from helpers import cli

from gazemonai.errors import InvalidInputError
from gazemonai.prep.outputs import VOLUME_SUFFIXES, check_output, same_path


@pytest.fixture
def inputs(synthetic_root, tmp_path):
    """A data set (images, masks, gaze.csv, train.txt, a prepare-slices manifest), a volume, a checkpoint."""
    import itk

    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    (data / "manifest.json").write_text('{"cases": {}}\n')
    volume = tmp_path / "volume.nii.gz"
    itk.imwrite(itk.image_from_array(np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)), str(volume))
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.ts").write_bytes(b"weights the user trained")
    return data, volume, models


def _snapshot(*folders):
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def _link(target, link, hard=False):
    (os.link if hard else os.symlink)(target, link)
    return link


def _seg(v, m, out):
    return ["segment-volume", "--volume", v, "--checkpoint", m / "model.ts", "--out", out]


def _predict(images, out):
    return ["predict", "--model", "models:/m@champion", "--images", images, "--out", out]


#: what is wrong: (the command and its arguments from the data folder, the volume, the models
#: folder and a scratch folder; the words of the message)
OUTPUT_OVER_INPUT = {
    "segment-volume writes over its volume": (
        lambda d, v, m, t: _seg(v, m, v),
        "is the --volume file it reads",
    ),
    "segment-volume through a symbolic link to its volume": (
        lambda d, v, m, t: _seg(v, m, _link(v, t / "mask.nii.gz")),
        "is the --volume file it reads",
    ),
    "segment-volume through a hard link to its volume": (
        lambda d, v, m, t: _seg(v, m, _link(v, t / "mask.nii.gz", hard=True)),
        "is the --volume file it reads",
    ),
    "segment-volume into a 2-D format (one slice of the volume)": (
        lambda d, v, m, t: _seg(v, m, t / "mask.png"),
        "cannot be written as .png; give a name ending in .nii.gz",
    ),
    "segment-volume into a format no writer knows": (
        lambda d, v, m, t: _seg(v, m, t / "mask.msk"),
        "cannot be written as .msk",
    ),
    "segment-volume without an extension": (
        lambda d, v, m, t: _seg(v, m, t / "mask"),
        "cannot be written as a file without extension",
    ),
    "predict writes masks over the images": (
        lambda d, v, m, t: _predict(d / "images", d / "images"),
        "is the --images folder it reads",
    ),
    "predict into a symbolic link to the images": (
        lambda d, v, m, t: _predict(d / "images", _link(d / "images", t / "masks")),
        "is the --images folder it reads",
    ),
    "evaluate into the data set": (
        lambda d, v, m, t: ["evaluate", "--model", "models:/m@champion", "--dataset-dir", d, "--out", d],
        "is the --dataset-dir folder it reads",
    ),
    "pseudo-masks into the data set (its manifest.json)": (
        lambda d, v, m, t: ["pseudo-masks", "--data-root", d, "--gaze-csv", d / "gaze.csv", "--out", d],
        "is the --data-root folder it reads",
    ),
    "pseudo-masks into the image folder": (
        lambda d, v, m, t: [
            "pseudo-masks",
            "--data-root",
            d,
            "--gaze-csv",
            d / "gaze.csv",
            "--out",
            d / "images",
        ],  # fmt: skip,
        "is the --images-dir folder it reads",
    ),
    "pseudo-masks over its own split file": (
        lambda d, v, m, t: [
            "pseudo-masks",
            "--data-root",
            d,
            "--gaze-csv",
            d / "gaze.csv",
            "--split",
            _link(d / "train.txt", t / "records.jsonl"),
            "--out",
            t,
        ],  # fmt: skip
        "writing records.jsonl there would overwrite the --split",
    ),
    "simulate-gaze over one of its masks": (
        lambda d, v, m, t: ["simulate-gaze", "--masks", d / "masks", "--out", d / "masks" / "synth_000.png"],
        "would overwrite a file of the --masks folder",
    ),
    "segment-volume over a file of its DICOM folder": (
        lambda d, v, m, t: _seg(v.parent, m, v),
        "would overwrite a file of the --volume folder",
    ),
    "simulate-gaze over its split file": (
        lambda d, v, m, t: [
            "simulate-gaze",
            "--masks",
            d / "masks",
            "--split",
            d / "train.txt",
            "--out",
            d / "train.txt",
        ],  # fmt: skip,
        "is the --split file it reads",
    ),
    "prepare-slices into the volume folder": (
        lambda d, v, m, t: [
            "prepare-slices",
            "--nifti-images",
            v.parent,
            "--nifti-masks",
            d / "masks",
            "--out",
            v.parent,
        ],  # fmt: skip
        "is the --nifti-images folder it reads",
    ),
    "derive-image-labels into the data set (its manifest.json)": (
        lambda d, v, m, t: ["derive-image-labels", "--dataset-dir", d, "--out", d],
        "is the --dataset-dir folder it reads",
    ),
    "export over its checkpoint": (
        lambda d, v, m, t: [
            "export",
            "--bundle-dir",
            "bundles/kvasir_gaze",
            "--checkpoint",
            m / "model.ts",
            "--out",
            m,
            "--format",
            "torchscript",
        ],  # fmt: skip
        "writing model.ts there would overwrite the --checkpoint",
    ),
    "report into the data set": (
        lambda d, v, m, t: [
            "report",
            "--dataset-dir",
            d,
            "--checkpoint",
            m / "model.ts",
            "--bundle-dir",
            "bundles/kvasir_gaze",
            "--out",
            d,
        ],  # fmt: skip
        "is the --dataset-dir folder it reads",
    ),
}


@pytest.mark.parametrize("problem", list(OUTPUT_OVER_INPUT))
def test_an_output_over_an_input_is_refused_before_any_work(inputs, tmp_path, problem, capsys):
    from gazemonai.cli import main

    data, volume, models = inputs
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    make, words = OUTPUT_OVER_INPUT[problem]
    argv = [str(a) for a in make(data, volume, models, scratch)]
    before = _snapshot(data, models, volume.parent)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and words in err and "\n" not in err, err
    assert err.startswith("gazemonai: error: --out "), err
    assert _snapshot(data, models, volume.parent) == before


def test_the_refusal_as_a_user_sees_it(inputs, tmp_path):
    _, volume, models = inputs
    p = cli(*_seg(volume, models, tmp_path / "mask.jpg"))
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        f"gazemonai: error: --out {tmp_path / 'mask.jpg'}: the result cannot be written as .jpg; "
        f"give a name ending in {', '.join(VOLUME_SUFFIXES)}"
    )
    assert not (tmp_path / "mask.jpg").exists()


def test_check_output_accepts_what_it_should(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    reads = {"images": tmp_path / "in"}
    # a new folder beside the input, a sub-folder of it, and a new volume file are fine
    assert check_output("out", tmp_path / "masks", folder=True, inputs=reads) == tmp_path / "masks"
    assert check_output("out", tmp_path / "in" / "masks", folder=True, inputs=reads, writes=("x",))
    assert check_output("out", tmp_path / "m.NII.GZ", suffixes=VOLUME_SUFFIXES)
    assert same_path(tmp_path / "in" / ".." / "in", tmp_path / "in")
    assert not same_path(tmp_path / "in", tmp_path / "nowhere")
    with pytest.raises(InvalidInputError, match="is the --images folder it reads"):
        check_output("out", tmp_path / "in" / ".." / "in", folder=True, inputs=reads)
    with pytest.raises(InvalidInputError, match="writing in there would overwrite the --images"):
        check_output("out", tmp_path, folder=True, inputs=reads, writes=("in",))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_that_is_not_writable_is_named(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(InvalidInputError, match="locked is not writable"):
        check_output("out", locked / "mask.nii.gz", suffixes=VOLUME_SUFFIXES)
