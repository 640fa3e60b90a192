"""A run folder handed to a user: nothing in its files runs as code or leads out of it (issue #26, kind 1).

MONAI's config parser runs a string starting with ``$``, resolves ``@``/``%`` and builds any dict
with a ``_target_``. Each case crafts a run record (``models/mlflow_run.json`` and the
``resolved_settings.json`` it points to) whose value would write a marker file if it ever reached
the parser, and runs the command a user would: the marker must not appear, and the command must stop
with a message naming the file and the setting.
"""

import json
import shutil

import pytest
import torch
from helpers import ROOT, cli

from gazemonai.errors import InvalidInputError

KVASIR = ROOT / "bundles" / "kvasir_gaze"
PROSTATE = ROOT / "bundles" / "prostate_gaze"


def _payloads(marker):
    """Values that would run code (or read a file) in MONAI's parser, each a valid setting once run."""
    write = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        "dollar": {"num_levels": f"$({write}) and 2"},
        "target": {"features": {"_target_": "builtins.exec", "_args_": [write]}},
        "macro": {"in_channels": f"%{marker.parent / 'macro.json'}::x"},
        "reference": {"num_levels": "@bundle_root"},
        "prompt": {"prompt_features": f"$({write}) and None"},
    }


def _crafted_run(tmp_path, checkpoint, settings, in_record=False):
    """A run folder with ``checkpoint`` and a run record whose resolved settings are ``settings``."""
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "outputs" / "config_r").mkdir(parents=True)
    shutil.copy(checkpoint, run / "models" / "model.pt")
    (run / "outputs" / "config_r" / "resolved_settings.json").write_text(json.dumps(settings))
    record = {
        "tracking_uri": f"sqlite:///{tmp_path / 'store' / 'mlruns.db'}",
        "experiment_name": "e",
        "run_name": "r",
        "run_id": "0" * 32,
        "config_dir": str(run / "outputs" / "config_r"),
    }
    if in_record:
        record["settings"] = settings
    (run / "models" / "mlflow_run.json").write_text(json.dumps(record))
    (tmp_path / "macro.json").write_text(json.dumps({"x": 3}))
    return run


@pytest.fixture(scope="module")
def prostate_checkpoint(tmp_path_factory):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(PROSTATE / "configs" / "inference.json"))
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("prostate") / "model.pt"
    torch.save(parser.get_parsed_content("network_def").state_dict(), path)
    return path


@pytest.mark.parametrize("kind", ["dollar", "target", "macro", "reference", "prompt"])
def test_export_runs_nothing_from_a_crafted_run_record(kind, kvasir_checkpoint, tmp_path):
    from gazemonai.serve.export import export_bundle

    marker = tmp_path / "marker"
    run = _crafted_run(tmp_path, kvasir_checkpoint, _payloads(marker)[kind])
    with pytest.raises(InvalidInputError, match="resolved_settings.json"):
        export_bundle(KVASIR, tmp_path / "out", run / "models" / "model.pt", formats=("onnx",))
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_export_on_the_command_line_says_which_file_and_setting(kvasir_checkpoint, tmp_path):
    marker = tmp_path / "marker"
    run = _crafted_run(tmp_path, kvasir_checkpoint, _payloads(marker)["dollar"], in_record=True)
    p = cli("export", "--bundle-dir", KVASIR, "--checkpoint", run / "models" / "model.pt",
            "--out", tmp_path / "out", "--format", "onnx")  # fmt: skip
    assert p.returncode == 2, p.stderr[-2000:]
    line = p.stderr.strip().splitlines()[-1]
    assert "mlflow_run.json" in line and "num_levels" in line and "'$'" in line, line
    assert "Traceback" not in p.stderr and not marker.exists()


@pytest.mark.parametrize("kind", ["dollar", "target"])
def test_register_runs_nothing_and_stores_nothing(kind, kvasir_checkpoint, tmp_path):
    from gazemonai.serve.registry import register_bundle

    marker = tmp_path / "marker"
    run = _crafted_run(tmp_path, kvasir_checkpoint, _payloads(marker)[kind])
    store = tmp_path / "registry.db"
    with pytest.raises(InvalidInputError, match="resolved_settings.json"):
        register_bundle(KVASIR, "m", run / "models" / "model.pt", tracking_uri=f"sqlite:///{store}")
    assert not marker.exists() and not store.exists()


def test_segment_volume_runs_nothing_from_a_crafted_run_record(prostate_checkpoint, tmp_path):
    from gazemonai.serve.registry import bundle_predictor

    marker = tmp_path / "marker"
    settings = {"image_size": f"$(open({str(marker)!r}, 'w').write('ran')) and [96, 96]"}
    run = _crafted_run(tmp_path, prostate_checkpoint, settings)
    with pytest.raises(InvalidInputError, match="image_size"):
        bundle_predictor(tmp_path / "staged", checkpoint=run / "models" / "model.pt", bundle_dir=PROSTATE)
    assert not marker.exists()
    p = cli("segment-volume", "--volume", tmp_path / "macro.json", "--out", tmp_path / "mask.nii.gz",
            "--bundle-dir", PROSTATE, "--checkpoint", run / "models" / "model.pt")  # fmt: skip
    assert p.returncode == 2 and "image_size" in p.stderr and not marker.exists(), p.stderr[-2000:]


def test_plain_bundle_inference_runs_nothing_from_a_crafted_run_record(
    kvasir_checkpoint, synthetic_root, tmp_path
):
    """``python -m monai.bundle run --config_file configs/inference.json`` reads the record too."""
    from helpers import run_module

    marker = tmp_path / "marker"
    run = _crafted_run(tmp_path, kvasir_checkpoint, _payloads(marker)["dollar"], in_record=True)
    p = run_module("monai.bundle", "run", "--config_file", KVASIR / "configs" / "inference.json",
                   "--bundle_root", run, "--dataset_dir", synthetic_root / "images",
                   "--output_dir", tmp_path / "pred", ok=False)  # fmt: skip
    assert p.returncode == 2 and not marker.exists(), p.stderr[-3000:]
    assert "error: " in p.stderr and "num_levels" in p.stderr


def _registered(kvasir_checkpoint, tmp_path, monkeypatch):
    """A model registered from a clean checkpoint; returns its store URI and staged bundle in the store."""
    from gazemonai.serve.registry import register_bundle

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.chdir(tmp_path)
    register_bundle(KVASIR, "m", kvasir_checkpoint, tracking_uri=uri)
    [staged] = [p.parent.parent for p in tmp_path.rglob("artifacts/bundle/configs/inference.json")]
    return uri, staged


def test_a_registered_model_with_code_in_its_settings_is_refused_at_load(
    kvasir_checkpoint, tmp_path, monkeypatch
):
    """A version registered by an older gazemonai from a crafted record: pyfunc load and predict refuse it."""
    import mlflow

    from gazemonai.serve.registry import _tracking

    uri, staged = _registered(kvasir_checkpoint, tmp_path, monkeypatch)
    clean = json.loads((staged / "configs" / "inference.json").read_text())
    assert all(not isinstance(clean[k], str) for k in ("num_levels", "features", "in_channels", "image_size"))
    marker = tmp_path / "marker"
    crafted = {**clean, "image_size": f"$(open({str(marker)!r}, 'w').write('ran')) and [64, 64]"}
    (staged / "configs" / "inference.json").write_text(json.dumps(crafted))
    with _tracking(uri), pytest.raises(InvalidInputError, match="image_size"):
        mlflow.pyfunc.load_model("models:/m/1")
    assert not marker.exists()
    (tmp_path / "images").mkdir()
    p = cli("predict", "--model", "models:/m/1", "--images", tmp_path / "images", "--out", tmp_path / "pred",
            "--tracking-uri", uri)  # fmt: skip
    assert p.returncode == 2 and "image_size" in p.stderr and not marker.exists(), p.stderr[-2000:]


def test_training_settings_of_a_registered_model_stay_data(kvasir_checkpoint, tmp_path):
    """``gazemonai evaluate`` passes the stored split settings to MONAI as overrides: checked first."""
    from gazemonai.serve.staging import evaluation_overrides, stage_bundle

    settings = {"seed": 3, "lr": "$x"}
    staged = stage_bundle(KVASIR, tmp_path / "s", kvasir_checkpoint, training_settings=settings)
    stored = json.loads((staged / "configs" / "training_settings.json").read_text())
    assert stored == {"seed": 3}  # only the checked model and split settings are stored
    assert evaluation_overrides(staged)["seed"] == 3
    (staged / "configs" / "training_settings.json").write_text(json.dumps({"val_group": "$exec('1')"}))
    with pytest.raises(InvalidInputError, match="val_group"):
        evaluation_overrides(staged)


def test_overrides_are_data_too(kvasir_checkpoint, tmp_path):
    from gazemonai.serve.staging import stage_bundle

    for bad in ({"image_size": "$[64, 64]"}, {"dataset_dir": "@bundle_root"}, {"device": {"_target_": "x"}},
                {"features": [8, 8, 8, 8, 8, 0]}):  # fmt: skip
        with pytest.raises(InvalidInputError):
            stage_bundle(KVASIR, tmp_path / "s", kvasir_checkpoint, bad)


def test_a_record_symlinked_from_outside_the_run_folder_is_refused(kvasir_checkpoint, tmp_path):
    from gazemonai.serve.staging import stage_bundle

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    record = {"tracking_uri": "sqlite:///x.db", "run_id": "a" * 32, "settings": {"image_size": [32, 32]}}
    (elsewhere / "mlflow_run.json").write_text(json.dumps(record))
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    shutil.copy(kvasir_checkpoint, run / "models" / "model.pt")
    (run / "models" / "mlflow_run.json").symlink_to(elsewhere / "mlflow_run.json")
    with pytest.raises(InvalidInputError, match="leads out of"):
        stage_bundle(KVASIR, tmp_path / "s", run / "models" / "model.pt")


def test_a_config_dir_outside_the_run_folder_is_refused(kvasir_checkpoint, tmp_path):
    from gazemonai.serve.staging import stage_bundle

    run = _crafted_run(tmp_path, kvasir_checkpoint, {"image_size": [32, 32]})
    record = json.loads((run / "models" / "mlflow_run.json").read_text())
    outside = tmp_path / "outside"
    shutil.copytree(record["config_dir"], outside)
    record["config_dir"] = str(outside)
    (run / "models" / "mlflow_run.json").write_text(json.dumps(record))
    with pytest.raises(InvalidInputError, match="outside the run folder"):
        stage_bundle(KVASIR, tmp_path / "s", run / "models" / "model.pt")
    # a symlinked resolved_settings.json inside the folder, pointing out, is refused as well
    record["config_dir"] = str(run / "outputs" / "config_r")
    (run / "models" / "mlflow_run.json").write_text(json.dumps(record))
    target = run / "outputs" / "config_r" / "resolved_settings.json"
    target.unlink()
    target.symlink_to(outside / "resolved_settings.json")
    with pytest.raises(InvalidInputError, match="leads out of"):
        stage_bundle(KVASIR, tmp_path / "s", run / "models" / "model.pt")


def test_a_model_uri_that_is_not_a_registry_uri_needs_to_be_asked_for(
    kvasir_checkpoint, synthetic_root, tmp_path, monkeypatch
):
    """Issue #26 kind 6: ``--model /a/folder`` is read as a path only with ``--any-model-uri``."""
    uri, staged = _registered(kvasir_checkpoint, tmp_path, monkeypatch)
    folder = staged.parent.parent  # the logged model: MLmodel, artifacts/bundle, ...
    images = synthetic_root / "images"
    for model in (folder, f"file://{folder}"):
        p = cli("predict", "--model", model, "--images", images, "--out", tmp_path / "pred",
                "--tracking-uri", uri)  # fmt: skip
        assert p.returncode == 2 and "--any-model-uri" in p.stderr and "not a registry URI" in p.stderr
        assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir())
    p = cli("predict", "--model", folder, "--images", images, "--out", tmp_path / "pred",
            "--tracking-uri", uri, "--any-model-uri")  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(list((tmp_path / "pred").iterdir())) == len(list(images.iterdir()))


def test_register_sends_the_model_to_a_recorded_store_only_when_asked(kvasir_checkpoint, tmp_path):
    """A handed-over run record naming someone's server: register stops before contacting it (#26 kind 1)."""
    run = _crafted_run(tmp_path, kvasir_checkpoint, {"num_levels": 2})
    record = json.loads((run / "models" / "mlflow_run.json").read_text())
    record["tracking_uri"] = "http://127.0.0.1:9/"  # nothing listens: a request would fail otherwise
    (run / "models" / "mlflow_run.json").write_text(json.dumps(record))
    p = cli("register", "--bundle-dir", KVASIR, "--checkpoint", run / "models" / "model.pt", "--name", "m")
    assert p.returncode == 2 and "names the tracking store http://127.0.0.1:9/" in p.stderr, p.stderr[-2000:]
    assert "--tracking-uri http://127.0.0.1:9/" in p.stderr and "Traceback" not in p.stderr
    assert not (run / "outputs" / "mlruns.db").exists()
