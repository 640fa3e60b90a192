"""The bundles' settings check: every bad value named, before any work."""

import pytest

from gazemonai.errors import InvalidInputError, MissingInputError
from gazemonai.train.settings import check_settings, exit_on_bad_settings

BAD = {
    "image_size": ([0, 64], [64], "64", [64.5, 64], [64, 64, 64], [64, 64, 64, 64]),
    "batch_size": (0, -1, 2.5, "8"),
    "epochs": (0, True),
    "iterations": (0,),
    "learning_rate": (0, -1e-3, float("nan"), "fast"),
    "weight_decay": (-1,),
    "val_fraction": (0, 1.0, 1.5),
    "val_interval": (0,),
    "num_workers": (-1,),
    "cache_workers": (-2,),
    "thresholds": ([], [0.5, 1.5], [0], "0.5", [float("inf")]),
    "gaze_sigma": (0, -70),
    "crf_max_side": (0, 8, 160.0),
    "features": ([16, 32, 64], [16, 32, 64, 128, 256, 0], "big"),
    "in_channels": (0,),
    "consistency_weight": (-3,),
    "limit": (0,),
    "seed": (-1,),
    "supervision": ("boxes",),
    "consistency": ("mean",),
    "compute_dtype": ("bf16", "fp32"),
    "train_step": ("sideways",),
    "level_init": ("random",),
    "step_in_backward": ("yes", 1),
    "release_memory": ("no",),
}
CASES = [(name, value) for name, values in BAD.items() for value in values]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}" for n, v in CASES])
def test_a_bad_value_is_named(name, value):
    with pytest.raises(InvalidInputError, match=f"^{name} must be"):
        check_settings(**{name: value})


def test_good_settings_pass_and_none_is_not_checked(tmp_path):
    (tmp_path / "gaze.csv").write_text("x")
    check_settings(
        image_size=[64, 64], batch_size=8, epochs=60, learning_rate=2e-3, weight_decay=0, val_fraction=0.1,
        val_interval=1, num_workers=0, cache_workers=2, thresholds=[0.5, 0.3], gaze_sigma=70,
        crf_max_side=None,
        features=[16, 32, 64, 128, 256, 16], in_channels=3, consistency_weight=3.0, limit=None, seed=0,
        dataset_dir=tmp_path, gaze_csv=tmp_path / "gaze.csv", supervision="gaze", consistency="prop",
        compute_dtype="bfloat16", train_step="joint", level_init="independent", step_in_backward=False,
        release_memory=False,
    )  # fmt: skip
    check_settings(supervision="full", gaze_csv=tmp_path / "none.csv")  # full masks read no gaze
    with pytest.raises(MissingInputError, match="gaze_csv '.*none.csv' does not exist"):
        check_settings(supervision="gaze", gaze_csv=tmp_path / "none.csv")
    with pytest.raises(MissingInputError, match="dataset_dir '.*nowhere' is not a folder"):
        check_settings(dataset_dir=tmp_path / "nowhere")
    with pytest.raises(TypeError, match="unexpected setting 'imagesize'"):
        check_settings(imagesize=[64, 64])


def test_bundle_configs_get_one_line_and_exit_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        exit_on_bad_settings(image_size=[0, 64])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err == "error: image_size must be 2 integers >= 1 (height, width), got [0, 64]\n"
    )
