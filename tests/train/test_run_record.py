"""The run record beside a checkpoint, read back as checked data; inference that knows its training."""

import json

import pytest
from helpers import ROOT, TRAINED, run_module

from gazemonai.errors import InvalidInputError
from gazemonai.train.run_record import (
    check_plain_data,
    check_trained_settings,
    read_json_inside,
    read_run_record,
    trained_settings,
)

KVASIR = ROOT / "bundles" / "kvasir_gaze"


@pytest.mark.parametrize(
    "value",
    ["$print(1)", " $x", "@bundle_root", "%file.json::key", {"_target_": "os.system"},
     [1, {"_requires_": "@x"}], {"a": ["$x"]}, float("nan"), {1: 2}, object()],
)  # fmt: skip
def test_values_monai_would_act_on_are_refused(value):
    with pytest.raises(InvalidInputError, match="v"):
        check_plain_data(value, "v")


def test_plain_values_pass():
    for value in (None, True, 3, 0.5, "cpu", "a@b.c", "50%", [1, [2]], {"device": "cpu"}):
        check_plain_data(value, "v")


@pytest.mark.parametrize(
    "settings, word",
    [({"image_size": [0, 64]}, "image_size"), ({"image_size": "$[64, 64]"}, "image_size"),
     ({"image_size": [64, 64, 64]}, "image_size"), ({"features": [8] * 5}, "features"),
     ({"num_levels": True}, "num_levels"), ({"num_levels": 2.0}, "num_levels"),
     ({"in_channels": "3"}, "in_channels"),
     ({"prompt_features": [8, 8]}, "prompt_features"), ({"val_group": "$x"}, "val_group"),
     ({"val_group": "study"}, "val_group"), ({"val_fraction": 1.5}, "val_fraction"), ({"seed": -1}, "seed"),
     ({"features": [8, 8, 8, 8, 10**9, 8]}, "features"), ({"image_size": [64, 10**6]}, "image_size"),
     ({"num_levels": 1000}, "num_levels")],
)  # fmt: skip
def test_trained_settings_are_checked_as_the_bundle_checks_them(settings, word):
    with pytest.raises(InvalidInputError, match=f"src.json: {word}"):
        check_trained_settings(settings, "src.json")


def test_only_the_model_and_split_settings_are_kept():
    resolved = {"image_size": [32, 32], "features": [8, 8, 16, 16, 32, 8], "num_levels": 2, "in_channels": 3,
                "prompt_features": None, "seed": 0, "val_fraction": 0.5, "val_group": None,
                "dataset_dir": "$anything", "device": "cpu"}  # fmt: skip
    kept = check_trained_settings(resolved, "x")
    assert kept == {k: v for k, v in resolved.items() if k not in ("dataset_dir", "device")}


def test_read_json_inside_refuses_big_files_and_nan(tmp_path):
    (tmp_path / "big.json").write_text(" " * (1 << 20) + "{}")
    with pytest.raises(InvalidInputError, match="bytes"):
        read_json_inside(tmp_path / "big.json", tmp_path)
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(InvalidInputError, match="not JSON"):
        read_json_inside(tmp_path / "deep.json", tmp_path)
    (tmp_path / "nan.json").write_text('{"seed": NaN}')
    with pytest.raises(InvalidInputError, match="not JSON"):
        read_json_inside(tmp_path / "nan.json", tmp_path)


def test_run_record_fields_are_checked(tmp_path):
    ckpt = tmp_path / "model.pt"
    assert read_run_record(ckpt) is None and trained_settings(ckpt) == {}
    for record, word in (
        ({"tracking_uri": "x"}, "run_id"),
        ({"tracking_uri": "x", "run_id": "../../etc"}, "run_id"),
        ({"tracking_uri": ["x"], "run_id": "a"}, "tracking_uri"),
        ({"tracking_uri": "x", "run_id": "a", "settings": {"features": "$f"}}, "features"),
        ([1], "object"),
    ):
        (tmp_path / "mlflow_run.json").write_text(json.dumps(record))
        with pytest.raises(InvalidInputError, match=word):
            read_run_record(ckpt)


def test_a_training_records_what_inference_needs_and_plain_inference_uses_it(
    trained_kvasir, synthetic_root, tmp_path
):
    """Issue #25 item 5: ``monai.bundle run --config_file inference.json`` on a model trained at 32x32 with
    other widths works without passing them again."""
    record = json.loads((trained_kvasir / "models" / "mlflow_run.json").read_text())
    assert record["settings"]["image_size"] == json.loads(TRAINED[1])
    assert record["settings"]["features"] == json.loads(TRAINED[3])
    assert trained_settings(trained_kvasir / "models" / "model.pt") == record["settings"]
    run_module("monai.bundle", "run", "--config_file", KVASIR / "configs" / "inference.json",
               "--bundle_root", trained_kvasir, "--dataset_dir", synthetic_root / "images",
               "--output_dir", tmp_path / "pred")  # fmt: skip
    images = sorted(p.name for p in (synthetic_root / "images").iterdir())
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == images
    # without the record, the bundle's own defaults do not fit these weights: the record was used
    (trained_kvasir / "models" / "mlflow_run.json").rename(tmp_path / "record.json")
    try:
        p = run_module("monai.bundle", "run", "--config_file", KVASIR / "configs" / "inference.json",
                       "--bundle_root", trained_kvasir, "--dataset_dir", synthetic_root / "images",
                       "--output_dir", tmp_path / "pred2", ok=False)  # fmt: skip
        assert p.returncode != 0
    finally:
        (tmp_path / "record.json").rename(trained_kvasir / "models" / "mlflow_run.json")


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_metadata_says_the_network_takes_any_multiple_of_16(name, tmp_path):
    configs = ROOT / "bundles" / name / "configs"
    meta = json.loads((configs / "metadata.json").read_text())
    tensors = meta["network_data_format"]
    for tensor in (tensors["inputs"]["image"], tensors["outputs"]["pred"]):
        assert tensor["spatial_shape"] == ["16*n", "16*n"]
    p = run_module("monai.bundle", "verify_net_in_out", "network_def",
                   "--meta_file", configs / "metadata.json", "--config_file", configs / "inference.json",
                   "--n", 3, "--bundle_root", tmp_path)  # fmt: skip
    assert "verified with no error" in p.stdout + p.stderr
