"""The image-label prompt through `python -m monai.bundle run`: stage 1, stage 2, evaluation, refusals."""

import json

import pytest
import torch
from helpers import ROOT, bundle, cli, configs, mlflow_runs, slice_named

from gazemonai.train.checkpoints import model_weights

SMALL = ["--image_size", "[32,32]", "--features", "[8,8,16,16,32,8]", "--batch_size", "2",
         "--num_workers", "0", "--cache_workers", "1", "--val_fraction", "0.34"]  # fmt: skip


@pytest.mark.parametrize("name", ["kvasir_gaze", "prostate_gaze"])
def test_two_stages_train_and_evaluate(name, synthetic_root, tmp_path):
    data = synthetic_root if name == "kvasir_gaze" else slice_named(synthetic_root, tmp_path / "slices")
    labels = tmp_path / "labels"
    derived = cli(
        "derive-image-labels",
        "--dataset-dir",
        data,
        "--out",
        labels,
        "--val-fraction",
        "0.34",
        "--size",
        "32",
    )
    assert derived.returncode == 0, derived.stderr
    out = tmp_path / "run"
    channels = [] if name == "kvasir_gaze" else ["--in_channels", "3"]
    common = ["--bundle_root", out, *SMALL, *channels]
    classes = "['no_polyp','polyp']"  # the derived crops' classes (prostate_gaze defaults to gland slices)
    bundle("--config_file", configs(name, "train.json", "prompt_stage1.json"), *common, "--epochs", 2,
           "--image_labels", labels / "labels.csv", "--image_label_classes", classes)  # fmt: skip
    stage1 = torch.load(out / "models" / "prompt_stage1" / "model.pt", weights_only=True)
    (run,) = mlflow_runs(out / "outputs" / "mlruns.db", name)
    assert {"val_auc", "val_accuracy", "train_loss"} <= set(run.data.metrics)
    assert run.data.params["stage"] == "prompt_stage1" and run.info.run_name == f"prompt_stage1_{name}"
    # the paper's U-shaped stage 1 by default: a decoder (ups.*) whose levels are the pyramid
    assert run.data.params["prompt_stage1_arch"] == "unet" and any(k.startswith("ups.3.") for k in stage1)

    seg = [*common, "--dataset_dir", data, "--gaze_csv", data / "gaze.csv"]
    stage2 = configs(name, "train.json", "prompt_stage2.json")
    bundle("--config_file", stage2, *seg, "--epochs", 1)  # default: models/prompt_stage1/model.pt
    model = torch.load(out / "models" / "model.pt", weights_only=True)  # bare state dict
    for key, value in stage1.items():  # the frozen stage-1 network is inside the stage-2 model as trained
        assert torch.equal(model[f"prompt.{key}"], value), key
    assert any(k.startswith("levels.1.short_skips") for k in model)  # two gaze levels, both prompted
    runs = mlflow_runs(out / "outputs" / "mlruns.db", name)
    params = next(r for r in runs if r.info.run_name == f"gaze_prompted_{name}").data.params
    assert params["freeze_prompt"] == "True" and params["prompt_checkpoint"].endswith(
        "prompt_stage1/model.pt"
    )
    assert params["prompt_stage1_arch"] == "unet"

    bundle("--config_file", configs(name, "train.json", "prompt_stage2.json", "evaluate.json"), *seg,
           "--eval_split", "test")  # fmt: skip
    report = json.loads((out / "outputs" / "metrics_test.json").read_text())
    assert report["images"] == 2 and 0.0 <= report["mean"]["ensemble"]["dice"] <= 1.0
    if name != "kvasir_gaze":
        return
    # served as any model: the recorded prompt_features reach inference.json (export, registry)
    ckpt = out / "models" / "model.pt"
    exported = cli(
        "export", "--bundle-dir", ROOT / "bundles" / name, "--checkpoint", ckpt, "--out", tmp_path / "x"
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert {"torchscript", "onnx"} <= set(json.loads(exported.stdout.strip().splitlines()[-1]))
    uri = f"sqlite:///{out / 'outputs' / 'mlruns.db'}"
    registered = cli("register", "--bundle-dir", ROOT / "bundles" / name, "--checkpoint", ckpt,
                     "--name", "prompted", "--tracking-uri", uri)  # fmt: skip
    assert registered.returncode == 0, registered.stderr[-3000:]
    evaluated = cli("evaluate", "--model", "models:/prompted/1", "--dataset-dir", data,
                    "--out", tmp_path / "ev", "--tracking-uri", uri)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = json.loads((tmp_path / "ev" / "outputs" / "metrics_test.json").read_text())
    assert again["mean"] == report["mean"]  # the registered model is the trained one, prompt included


def test_stage_two_refuses_a_stage_one_of_other_widths(synthetic_root, tmp_path):
    from gazemonai.train.networks import PyramidClassifier

    wrong = tmp_path / "stage1.pt"
    torch.save({"model": PyramidClassifier(features=[8, 8, 16, 16, 64]).state_dict()}, wrong)
    common = ["--bundle_root", tmp_path / "run", "--dataset_dir", synthetic_root, *SMALL, "--epochs", 1]
    stage2 = configs("kvasir_gaze", "train.json", "prompt_stage2.json")
    done = bundle(
        "--config_file", stage2, *common, "--supervision", "full", "--prompt_checkpoint", wrong, ok=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: stage-1 checkpoint")
        and "widths [8, 8, 16, 16, 64]" in last
        and "--features" in last
    )
    assert not (tmp_path / "run" / "models" / "model.pt").exists()  # nothing trained

    missing = bundle("--config_file", stage2, *common, "--supervision", "full", ok=False)
    assert (
        missing.returncode == 2
        and "prompt_checkpoint" in missing.stderr
        and "train stage 1 first" in missing.stderr
    )

    frozen = bundle("--config_file", stage2, *common, "--supervision", "full", "--prompt_checkpoint", wrong,
                    "--freeze_prompt", "false", ok=False)  # fmt: skip
    assert frozen.returncode == 2 and "freeze_prompt must be true or false" in frozen.stderr


def test_stage_one_settings_are_checked(tmp_path):
    stage1 = configs("kvasir_gaze", "train.json", "prompt_stage1.json")
    common = ["--bundle_root", tmp_path / "run", *SMALL]
    absent = bundle("--config_file", stage1, *common, "--image_labels", tmp_path / "nowhere.csv", ok=False)
    assert (
        absent.returncode == 2 and "image_labels" in absent.stderr and "derive-image-labels" in absent.stderr
    )
    (tmp_path / "labels.csv").write_text("image,label\n")
    three = bundle("--config_file", stage1, *common, "--image_labels", tmp_path / "labels.csv",
                   "--image_label_classes", "['a','b','c']", ok=False)  # fmt: skip
    assert three.returncode == 2 and "image_label_classes must be two different class names" in three.stderr
    assert (ROOT / "bundles" / "prostate_gaze" / "configs" / "prompt_stage1.json").is_file()


def test_encoder_only_stage_one_is_an_option_and_a_mismatch_is_refused(synthetic_root, tmp_path):
    """--prompt_stage1_arch encoder: the former encoder-only stage 1 through both stages; a stage-1
    checkpoint of the other form is refused by stage 2 with the setting to change."""
    labels = tmp_path / "labels"
    derived = cli("derive-image-labels", "--dataset-dir", synthetic_root, "--out", labels,
                  "--val-fraction", "0.34", "--size", "32")  # fmt: skip
    assert derived.returncode == 0, derived.stderr
    out = tmp_path / "run"
    encoder = ["--bundle_root", out, *SMALL, "--epochs", 1, "--prompt_stage1_arch", "encoder"]
    bundle("--config_file", configs("kvasir_gaze", "train.json", "prompt_stage1.json"), *encoder,
           "--image_labels", labels / "labels.csv")  # fmt: skip
    stage1 = model_weights(torch.load(out / "models" / "prompt_stage1" / "model.pt", weights_only=True))
    assert not any(k.startswith("ups.") for k in stage1) and stage1["head.weight"].shape == (
        1,
        8 + 8 + 16 + 16 + 32,
    )
    seg = ["--dataset_dir", synthetic_root, "--supervision", "full"]
    stage2 = configs("kvasir_gaze", "train.json", "prompt_stage2.json")
    bundle("--config_file", stage2, *encoder, *seg)
    model = model_weights(torch.load(out / "models" / "model.pt", weights_only=True))
    assert torch.equal(model["prompt.head.weight"], stage1["head.weight"])
    assert model["levels.0.short_skips.0.weight"].shape[1] == 8 + 8  # encoder level 0 + stage-1 conv_0

    other = ["--bundle_root", tmp_path / "other", *SMALL, "--epochs", 1]  # the default: a U-Net stage 1
    refused = bundle("--config_file", stage2, *other, *seg, "--prompt_checkpoint",
                     out / "models" / "prompt_stage1" / "model.pt", ok=False)  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-2000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert "form 'encoder'" in last and "form 'unet'" in last and "--prompt_stage1_arch" in last
