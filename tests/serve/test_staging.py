"""A bundle's configs and a checkpoint staged as one servable folder."""

import json

import pytest
from helpers import ROOT

from gazemonai.errors import InvalidInputError, MissingInputError
from gazemonai.serve.staging import MODEL_SETTINGS, locate_bundle, stage_bundle

BUNDLE = ROOT / "bundles" / "kvasir_gaze"


def test_stage_writes_configs_checkpoint_and_overrides(kvasir_checkpoint, tmp_path):
    dest = tmp_path / "staged"
    (dest / "stale").mkdir(parents=True)  # an earlier staging is replaced, not merged
    out = stage_bundle(BUNDLE, dest, kvasir_checkpoint, {"image_size": [96, 96], "features": [8] * 6})
    assert out == dest and not (dest / "stale").exists()
    assert (dest / "models" / "model.pt").read_bytes() == kvasir_checkpoint.read_bytes()
    inference = json.loads((dest / "configs" / "inference.json").read_text())
    assert inference["image_size"] == [96, 96] and inference["features"] == [8] * 6
    original = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    # every model setting is written as a plain value: the overrides, else the bundle's defaults
    model = MODEL_SETTINGS
    expected = {**original["model_defaults"], "image_size": [96, 96], "features": [8] * 6}
    assert {k: inference[k] for k in model} == expected
    assert {k: v for k, v in inference.items() if k not in model} == {
        k: v for k, v in original.items() if k not in model
    }
    assert (dest / "LICENSE").is_file() and (dest / "docs" / "README.md").is_file()
    assert sorted(p.name for p in (dest / "configs").iterdir()) == sorted(
        p.name for p in (BUNDLE / "configs").iterdir()
    )


def test_missing_files_and_unknown_overrides_are_named(kvasir_checkpoint, tmp_path):
    with pytest.raises(MissingInputError, match="nope.pt"):
        locate_bundle(BUNDLE, tmp_path / "nope.pt")
    with pytest.raises(MissingInputError, match="configs/inference.json"):
        locate_bundle(tmp_path, kvasir_checkpoint)
    with pytest.raises(InvalidInputError, match="\\['imag_size'\\] are not keys of"):
        stage_bundle(BUNDLE, tmp_path / "s", kvasir_checkpoint, {"imag_size": [96, 96]})
