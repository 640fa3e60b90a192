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


def test_checkpoint_interval_is_checked():
    check_settings(checkpoint_interval=None)
    check_settings(checkpoint_interval=500)
    for bad in (0, 2.5, True, "500"):
        with pytest.raises(InvalidInputError, match="^checkpoint_interval must be an integer >= 1"):
            check_settings(checkpoint_interval=bad)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"compute_dtype": "float16"}, "compute_dtype 'float16' needs a GradScaler: set amp true"),
        ({"device": "cuda:0", "compute_dtype": "float16"}, "needs a GradScaler"),
        ({"device": "cuda", "compute_dtype": "float32", "amp": True}, "amp needs compute_dtype 'float16' or"),
        ({"device": "cpu", "compute_dtype": "bfloat16", "amp": True}, r"it needs a CUDA device, got 'cpu'"),
        (
            {"device": "cuda", "compute_dtype": "float16", "amp": True, "train_step": "levelwise"},
            "amp \\(GradScaler\\) needs train_step 'joint'",
        ),
        ({"device": "cuda", "compile": True, "train_step": "levelwise"}, "compile needs train_step 'joint'"),
        ({"device": "cuda", "compile": True, "release_memory": True}, "compile needs train_step 'joint'"),
        ({"device": "cpu", "compile": True}, "compile does not work on CPU"),
    ],
)
def test_precision_and_compile_combinations_that_cannot_work_are_refused(settings, message):
    import torch

    if "device" in settings:  # the bundles pass a torch.device
        settings = {**settings, "device": torch.device(settings["device"])}
    with pytest.raises(InvalidInputError, match=message):
        check_settings(**settings)


def test_precision_and_compile_combinations_that_work_pass():
    import torch

    cuda = torch.device("cuda")
    check_settings(device=cuda, compute_dtype="float16", amp=True, train_step="joint")  # MONAI's GradScaler
    check_settings(device=cuda, compute_dtype="bfloat16", amp=True)
    check_settings(device=cuda, compute_dtype="bfloat16", compile=True, channels_last=True)
    check_settings(
        device=torch.device("cpu"), compute_dtype="bfloat16", channels_last=True, train_step="levelwise"
    )
    for name in ("amp", "compile", "channels_last", "pin_memory", "non_blocking", "mlflow_iteration_log"):
        with pytest.raises(InvalidInputError, match=f"^{name} must be true or false"):
            check_settings(**{name: "false"})
