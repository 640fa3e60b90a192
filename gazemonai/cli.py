"""The ``gazemonai`` command line (``python -m gazemonai`` works too).

Commands::

    gazemonai pseudo-masks  --data-root DIR --gaze-csv CSV --out DIR [options]
    gazemonai simulate-gaze --masks DIR --out CSV [--seed 0]
    gazemonai register      --bundle-dir DIR --name NAME [--checkpoint PT] [--alias champion]
    gazemonai evaluate      --model models:/NAME@ALIAS --dataset-dir DIR --out DIR [--eval-split test]
    gazemonai predict       --model models:/NAME@ALIAS --images DIR --out DIR
    gazemonai export        --bundle-dir DIR --checkpoint PT --out DIR [--format torchscript,onnx]
    gazemonai report        --dataset-dir DIR --gaze-csv CSV --run-dir RUN --bundle-dir DIR --out DIR
    gazemonai segment-volume --volume MR.nii.gz --out MASK.nii.gz --bundle-dir DIR --checkpoint PT
    gazemonai annotate      --images DIR --out gaze.csv [--port 8765] [--source pointer|gazepoint|replay]
    gazemonai annotate      --server http://host:8000 --out gaze.csv [--strategy disagreement|entropy|...]
    gazemonai prepare-slices --out DIR (--nifti-images DIR --nifti-masks DIR
                                        | --dicom-root DIR --labels-root DIR)

``gazemonai COMMAND --help`` lists every option.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import logging
import math
import re
import sys
from pathlib import Path

from .errors import GazemonaiError, InvalidInputError, MissingInputError

__all__ = [
    "annotate",
    "evaluate",
    "export",
    "main",
    "predict",
    "prepare_slices",
    "pseudo_masks",
    "register",
    "report",
    "segment_volume",
    "simulate_gaze",
]

logger = logging.getLogger("gazemonai")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# -- option types: declared, never guessed -------------------------------------------------------------
# fire reads a value as a Python literal when it can: `--out 1e3` was the float 1000.0 (a folder named
# "1000.0"), `--out a#b` the name `a` (the rest a comment), `--ids a,b` a tuple. Each command declares its
# options' types instead (fire.decorators.SetParseFns): fire hands each option's function the text as
# typed, and that one function parses and range-checks it, naming the option when it refuses.


def _options(**types):
    """Declare a command's option types: ``name=parse`` with ``parse(flag, text)``, for those not text.

    Every other option is text as typed (:func:`_text`), or a switch when its default is ``True``/``False``
    (:func:`_switch`). fire keeps the declaration in the function's ``FIRE_METADATA`` attribute, which its
    help and usage lines list as a "group" (fire's own decorator; nothing to run).
    """
    import fire.decorators

    def declare(command):
        parse = {}
        for name, param in inspect.signature(command).parameters.items():
            default = _switch if isinstance(param.default, bool) else _text
            parse[name] = functools.partial(types.pop(name, default), _flag(name))
        if types:
            raise TypeError(f"{command.__name__} has no option(s) {', '.join(types)}")
        return fire.decorators.SetParseFns(**parse)(command)

    return declare


def _text(flag: str, text: str) -> str:
    """A path or a name, exactly as typed."""
    if not text:
        raise InvalidInputError(f"{flag} needs a value such as a path or a name")
    return text


def _texts(flag: str, text: str) -> list[str]:
    """Names separated by commas (``020,021``, ``[a,b]``), each as typed."""
    names = [name.strip() for name in text.strip("[]() ").split(",") if name.strip()]
    if not names:
        raise InvalidInputError(f"{flag} needs a value such as a,b")
    return names


def _switch(flag: str, text: str) -> bool:
    """A setting without a value: fire gives "True" for ``--flag`` and "False" for ``--noflag``."""
    if text.lower() not in ("true", "false"):
        raise InvalidInputError(f"{flag} takes no value, got {text!r}")
    return text.lower() == "true"


def _integer(minimum: int, maximum: int | None = None):
    """An integer in [``minimum``, ``maximum``]."""

    def parse(flag: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise InvalidInputError(f"{flag} must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise InvalidInputError(f"{flag} must be an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise InvalidInputError(f"{flag} must be <= {maximum}, got {value}")
        return value

    return parse


def _number(rule: str = "> 0", ok=lambda value: value > 0):
    """A finite number for which ``ok`` holds (``rule`` says which, for the message)."""

    def parse(flag: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):  # 1e400 is inf to float()
            raise InvalidInputError(f"{flag} must be a number, got {text!r}")
        if not ok(value):
            raise InvalidInputError(f"{flag} must be {rule}, got {text}")
        return value

    return parse


def _numbers(flag: str, text: str) -> tuple[float, ...]:
    """Numbers separated by commas: ``0.5,0.3``; their range is the setting's to check."""
    try:
        return tuple(float(v) for v in text.strip("[]() ").split(","))
    except ValueError:
        raise InvalidInputError(f"{flag} must be numbers separated by commas, got {text!r}") from None


def _literal_dict(flag: str, text: str) -> dict:
    """A dict written as a Python literal, read as fire reads one: ``"{'num_workers': 0}"``."""
    from fire.parser import DefaultParseValue

    value = DefaultParseValue(text)
    if not isinstance(value, dict):
        raise InvalidInputError(f"{flag} must be a dict such as \"{{'num_workers': 0}}\", got {text!r}")
    return value


def _output_folder(name: str, path, create: bool = True, inputs: dict | None = None, writes=()) -> Path:
    """An output folder that is (or can be made) writable and holds none of ``inputs``, or one line why not.

    With ``create`` it is made now; otherwise only the folder it would be made in is checked.
    ``inputs`` (option -> path) and ``writes`` (names written inside): see
    :func:`gazemonai.prep.outputs.check_output`, the check every command shares.
    """
    from .prep.outputs import check_output

    path = check_output(name, str(path), folder=True, inputs=inputs, writes=writes)
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InvalidInputError(f"{_flag(name)} {path}: cannot create the folder ({e.strerror})") from e
    return path


def _output_file(name: str, path, inputs: dict | None = None, suffixes=None) -> Path:
    """An output file whose folder exists (created) and is writable, that is none of ``inputs``."""
    from .prep.outputs import check_output

    path = Path(str(path))
    if path.is_dir():
        raise InvalidInputError(
            f"{_flag(name)} {path} is a folder; give a file name such as {path / 'gaze.csv'}"
        )
    check_output(name, path, inputs=inputs, suffixes=suffixes)
    _output_folder(name, path.parent)
    return path


@_options(thresholds=_numbers, sigma=_number(), max_side=_integer(1), limit=_integer(1), workers=_integer(1))
def pseudo_masks(
    data_root: str,
    gaze_csv: str,
    out: str,
    preset: str = "kvasir",
    split: str | None = None,
    thresholds=None,
    sigma: float | None = None,
    max_side: int | None = None,
    full_resolution: bool = False,
    heatmap_mode: str | None = None,
    no_crf: bool = False,
    images_dir: str = "images",
    masks_dir: str = "masks",
    limit: int | None = None,
    workers: int | None = None,
    strict: bool = False,
    no_maps: bool = False,
    quiet: bool = False,
    annotator: str | None = None,
):
    """Write heatmaps, CRF-refined maps and per-level pseudo-masks for a dataset folder.

    Resumes: images already done with the same parameters (per OUT/records.jsonl) are skipped.
    Ends with a JSON summary (images done/resumed/skipped/failed, mean Dice per level vs the GT in
    DATA_ROOT/masks when present); exits 1 if any image failed.

    Args:
        data_root: folder with images/ (and masks/ for the Dice summary).
        gaze_csv: fixation CSV in the GazeMedSeg schema.
        out: output folder.
        preset: parameter set, "kvasir" (sigma 70, thresholds 0.5,0.3) or "prostate" (50; 0.2,0.4).
        split: file of ids (one per line) to process, e.g. DATA_ROOT/train.txt; default all of the CSV.
        thresholds: comma-separated thresholds, one per level (overrides the preset).
        sigma: heatmap Gaussian sigma on the 768 canvas (overrides the preset).
        max_side: CRF working resolution, longer side in pixels (default 160).
        full_resolution: run the CRF at full resolution, as the original recipe (slow).
        heatmap_mode: "fast" (default) or "reference".
        no_crf: threshold the heatmap itself, without CRF refinement.
        images_dir: image sub-folder name.
        masks_dir: ground-truth sub-folder name.
        limit: process at most this many images.
        workers: processes to use (default: all cores).
        strict: treat images missing on disk or without fixations as errors instead of skips.
        no_maps: write only the pseudo-masks, not the heatmap/refined maps.
        quiet: no progress bar.
        annotator: use only this annotator's fixations (a CSV of `gazemonai annotate` with several).
    """
    from .gaze.dataset import run_pseudo_masks
    from .gaze.pseudo_masks import PRESETS
    from .prep.io import read_ids

    if preset not in PRESETS:
        raise InvalidInputError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    config = PRESETS[preset].replace(
        thresholds=thresholds, sigma=sigma, heatmap_mode=heatmap_mode
    )  # the config checks every value it holds (range, choices), naming it
    if max_side is not None:
        config = config.replace(max_side=max_side)
    if full_resolution:
        config = dataclasses.replace(config, max_side=None)
    if no_crf:
        config = dataclasses.replace(config, refine=False)
    ids = read_ids(split) if split else None
    from .gaze.dataset import level_dirs

    reads = {"data_root": data_root, "gaze_csv": gaze_csv, "split": split}
    reads.update({"images_dir": Path(data_root) / images_dir, "masks_dir": Path(data_root) / masks_dir})
    writes = ("heatmap", "refined", "records.jsonl", "manifest.json", *level_dirs(len(config.thresholds)))
    _output_folder("out", out, create=False, inputs=reads, writes=writes)  # made once the CSV has been read
    summary = run_pseudo_masks(
        data_root,
        gaze_csv,
        out,
        config=config,
        images_dir=images_dir,
        masks_dir=masks_dir,
        ids=ids,
        limit=limit,
        workers=workers,
        strict=strict,
        save_maps=not no_maps,
        progress=not quiet,
        annotator=annotator,
    )
    print(_format_summary(summary, out))
    print(json.dumps(summary))
    if summary["failed"]:
        raise SystemExit(1)


def _format_summary(s: dict, out: str) -> str:
    lines = [
        f"pseudo-masks: {s['done']} done, {s['resumed']} already done (resumed), "
        f"{s['skipped_missing']} skipped (image not on disk), {s['skipped_no_gaze']} skipped (no fixations), "
        f"{s['failed']} failed  [{s['seconds']} s, {s['workers']} workers]",
    ]
    for name, v in s["dice_vs_gt"].items():
        lines.append(f"  {name} (threshold {v['threshold']}): mean Dice vs GT {v['mean_dice']:.4f}")
    if s["dice_vs_gt"]:
        lines.append(f"  ({s['dice_convention']})")
    if s["gaze_size_mismatch"]:
        lines.append(
            f"  note: {s['gaze_size_mismatch']} image(s) differ in size from IMAGE_HEIGHT/WIDTH of the CSV"
        )
    lines.append(f"outputs and manifest.json in {out}")
    return "\n".join(lines)


@_options(seed=_integer(0))
def simulate_gaze(
    masks: str, out: str, seed: int = 0, split: str | None = None, image_suffix: str | None = None
):
    """Simulate eye-tracking fixations from a folder of masks and write them as a GazeMedSeg CSV.

    Args:
        masks: folder of binary masks (0/255 or 0/1 PNG/JPEG).
        out: CSV to write.
        seed: random seed; the same seed, mask and name always give the same fixations.
        split: file of ids (one per line) to simulate; default every mask in the folder.
        image_suffix: extension to record in IMAGE (default: the mask's file name), e.g. ".jpg".
    """
    from .gaze.simulate import GazeSimulator, simulate_gaze_folder
    from .prep.io import read_ids

    if image_suffix is not None and not image_suffix.startswith("."):
        raise InvalidInputError(f"--image-suffix must be an extension such as .jpg, got {image_suffix!r}")
    ids = read_ids(split) if split else None
    _output_file("out", out, inputs={"masks": masks, "split": split})
    summary = simulate_gaze_folder(masks, out, GazeSimulator(seed=seed), ids=ids, image_suffix=image_suffix)
    print(f"simulated {summary['fixations']} fixations on {summary['images']} images -> {summary['csv']}")
    print(json.dumps(summary))


@_options(override=_literal_dict, alias=_texts)
def register(
    bundle_dir: str,
    name: str,
    checkpoint: str | None = None,
    tracking_uri: str | None = None,
    override: dict | None = None,
    run_id: str | None = None,
    experiment_name: str | None = None,
    alias=None,
):
    """Register a trained bundle in the MLflow model registry as an ``mlflow.pyfunc`` model.

    The model runs the bundle's inference.json in memory: ``mlflow.pyfunc.load_model(
    "models:/NAME/VERSION").predict(images)`` with (N, H, W, C) images gives (N, H, W) 0/1 masks.
    It is logged into the run that trained the checkpoint (models/mlflow_run.json beside it), and the
    version is tagged with that run's best validation Dice.

    Args:
        bundle_dir: bundle folder with configs/inference.json, e.g. bundles/kvasir_gaze.
        name: registered model name (a new version is added if it exists).
        checkpoint: trained weights (default BUNDLE_DIR/models/model.pt), e.g. runs/gaze1/models/model.pt.
        tracking_uri: MLflow server or sqlite:/// URI (default: the training's, from its run record;
            else $MLFLOW_TRACKING_URI; else outputs/mlruns.db next to the checkpoint's models/ folder).
        override: inference.json values to use, e.g. "{'image_size': [96, 96]}" (default: those the
            recorded training used).
        run_id: log into this existing run instead of the recorded training run.
        experiment_name: experiment of a new run (when the training run is not in the store).
        alias: registered-model alias(es) to point at the new version, e.g. champion or "[champion,b]".
    """
    from .serve.registry import register_bundle

    aliases = alias or []
    info = register_bundle(
        bundle_dir,
        name,
        checkpoint=checkpoint,
        overrides=override,
        tracking_uri=tracking_uri,
        experiment_name=experiment_name,
        run_id=run_id,
        aliases=aliases,
    )
    version = str(info.registered_model_version)
    uris = [f"models:/{name}/{version}"] + [f"models:/{name}@{a}" for a in aliases]
    print(f"registered {name} version {version}: {', '.join(uris)}")
    print(
        json.dumps(
            {
                "name": name,
                "version": version,
                "aliases": aliases,
                "run_id": info.run_id,
                "model_uri": info.model_uri,
            }
        )
    )


def _input_folder(name: str, value: str) -> str:
    path = Path(value)
    if not path.is_dir():
        raise InvalidInputError(f"{_flag(name)} {path}: no such folder")
    return str(path)


@_options(override=_literal_dict)
def evaluate(
    model: str,
    dataset_dir: str,
    out: str,
    eval_split: str = "test",
    tracking_uri: str | None = None,
    override: dict | None = None,
    any_model_uri: bool = False,
):
    """Evaluate a registered model on a data set: the report evaluate.json writes, from the registry.

    Runs the model's own bundle (train.json + evaluate.json, with the settings it was trained with) on
    DATASET_DIR's EVAL_SPLIT, writing OUT/outputs/metrics_<split>.json and an MLflow run in
    OUT/outputs/mlruns.db.

    Args:
        model: registered model URI, e.g. models:/kvasir_gaze@champion or models:/kvasir_gaze/3.
        dataset_dir: data folder as for training (images/, masks/, split files).
        out: run folder (the bundle_root of the evaluation).
        eval_split: test, val, train, or a split file name under DATASET_DIR.
        tracking_uri: the registry (default $MLFLOW_TRACKING_URI).
        override: more bundle values, e.g. "{'num_workers': 0, 'eval_limit': 10}".
        any_model_uri: accept a MODEL that is not a registry URI (a folder, file:, s3://...).
    """
    from .serve.registry import run_registered_bundle
    from .train.settings import config_path

    overrides = {
        **(override or {}),
        "dataset_dir": _input_folder("dataset_dir", dataset_dir),
        "eval_split": eval_split,
    }
    config_path("--dataset-dir", overrides["dataset_dir"])  # '#' refused before the folder is made
    config_path("--out", out)
    out = _output_folder("out", out, inputs={"dataset_dir": overrides["dataset_dir"]})
    metrics = run_registered_bundle(
        model, "evaluate", out, tracking_uri=tracking_uri, any_uri=any_model_uri, **overrides
    )
    report = json.loads(metrics.read_text())
    print(f"evaluated {model} on {report['images']} images of {overrides['eval_split']}: {metrics}")
    print(json.dumps({"model": model, "metrics": str(metrics), "mean": report["mean"]}))


@_options(override=_literal_dict)
def predict(
    model: str,
    images: str,
    out: str,
    tracking_uri: str | None = None,
    override: dict | None = None,
    any_model_uri: bool = False,
):
    """Segment a folder of images with a registered model: one mask per image, as inference.json writes.

    Args:
        model: registered model URI, e.g. models:/kvasir_gaze@champion.
        images: folder of images (.png, .jpg, .jpeg).
        out: folder for the masks.
        tracking_uri: the registry (default $MLFLOW_TRACKING_URI).
        override: more inference.json values, e.g. "{'device': 'cpu'}".
        any_model_uri: accept a MODEL that is not a registry URI (a folder, file:, s3://...).
    """
    from .serve.registry import run_registered_bundle
    from .train.settings import config_path

    overrides = {**(override or {}), "dataset_dir": _input_folder("images", images)}
    config_path("--images", overrides["dataset_dir"])  # '#' refused before the folder is made
    config_path("--out", out)
    out = _output_folder("out", out, inputs={"images": overrides["dataset_dir"]})
    folder = run_registered_bundle(
        model, "inference", out, tracking_uri=tracking_uri, any_uri=any_model_uri, **overrides
    )
    written = sorted(p.name for p in folder.iterdir() if p.is_file())
    print(f"{len(written)} masks from {model} in {folder}")
    print(json.dumps({"model": model, "out": str(folder), "masks": len(written)}))


@_options(format=_texts, override=_literal_dict)
def export(
    bundle_dir: str,
    out: str,
    checkpoint: str | None = None,
    format=("torchscript", "onnx"),
    override: dict | None = None,
):
    """Export a trained bundle's network as TorchScript (model.ts) and ONNX (model.onnx), any image size.

    Uses MONAI's ckpt_export and onnx_export; each file is loaded back and compared with the eager
    network (the bundle's image_size and 50x70) before this reports success. The bundle's
    configs/inference_torchscript.json and inference_onnx.json run inference with them.

    Args:
        bundle_dir: bundle folder with configs/inference.json, e.g. bundles/kvasir_gaze.
        out: folder for the files, e.g. the training's models/ folder.
        checkpoint: trained weights (default BUNDLE_DIR/models/model.pt).
        format: torchscript, onnx, or both separated by a comma.
        override: inference.json values (default: the recorded training's), e.g. "{'image_size': [96, 96]}".
    """
    from .serve.export import export_bundle

    reads = {"bundle_dir": bundle_dir, "checkpoint": checkpoint}
    results = export_bundle(
        bundle_dir,
        _output_folder("out", out, inputs=reads, writes=("model.ts", "model.onnx")),
        checkpoint=checkpoint,
        formats=tuple(f.lower() for f in format),
        overrides=override or None,
    )
    for fmt, result in results.items():
        difference = result["max_abs_difference"]
        print(f"{fmt}: {result['path']} (largest difference from the eager network: {difference})")
    print(json.dumps(results))


@_options()
def segment_volume(
    volume: str,
    out: str,
    bundle_dir: str | None = None,
    checkpoint: str | None = None,
    model: str | None = None,
    tracking_uri: str | None = None,
    any_model_uri: bool = False,
):
    """Segment an MR volume slice by slice with the prostate model: a mask volume with its geometry.

    Args:
        volume: NIfTI / NRRD / MHA file, or a DICOM series folder.
        out: mask file, e.g. mask.nii.gz (0 background, 1 gland; the volume's spacing, origin, direction).
        bundle_dir: the checkpoint's bundle, e.g. bundles/prostate_gaze.
        checkpoint: trained weights, e.g. runs/prostate/models/model.pt.
        model: a registered model instead, e.g. models:/prostate_gaze@champion.
        tracking_uri: the registry (default $MLFLOW_TRACKING_URI).
        any_model_uri: accept a MODEL that is not a registry URI (a folder, file:, s3://...).
    """
    import tempfile

    from .serve.registry import bundle_predictor
    from .serve.volume import segment_volume as segment

    path = Path(volume)
    if not path.exists():
        raise InvalidInputError(f"--volume {path}: no such file or DICOM folder")
    from .prep.outputs import VOLUME_SUFFIXES

    reads = {"volume": path, "checkpoint": checkpoint}
    out = _output_file("out", out, inputs=reads, suffixes=VOLUME_SUFFIXES)
    with tempfile.TemporaryDirectory() as tmp:
        predictor = bundle_predictor(
            Path(tmp),
            checkpoint=checkpoint,
            bundle_dir=bundle_dir,
            model_uri=model,
            tracking_uri=tracking_uri,
            any_uri=any_model_uri,
        )
        summary = segment(path, out, predictor)
    print(f"{summary['slices_with_mask']} of {summary['shape'][0]} slices segmented -> {out}")
    print(json.dumps(summary))


@_options(ids=_texts, samples=_integer(1), seed=_integer(0))
def report(
    dataset_dir: str,
    out: str,
    gaze_csv: str | None = None,
    run_dir: str | None = None,
    bundle_dir: str | None = None,
    checkpoint: str | None = None,
    model: str | None = None,
    metrics: str | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    preset: str = "kvasir",
    ids=None,
    samples: int = 6,
    seed: int = 0,
):
    """Pictures of a run: gaze -> pseudo-masks -> prediction vs ground truth, curves, Dice; one HTML page.

    Writes OUT/samples/<id>.png, OUT/curves.png, OUT/dice.png and OUT/report.html (self-contained).
    With --run-dir (a training's bundle_root) the checkpoint, the MLflow run and the newest
    evaluation report (outputs/metrics_*.json) are found there.

    Args:
        dataset_dir: data folder with images/ (and masks/).
        out: report folder.
        gaze_csv: fixation CSV (the gaze panels).
        run_dir: a training's bundle_root: models/model.pt, models/mlflow_run.json, outputs/metrics_*.json.
        bundle_dir: the checkpoint's bundle, e.g. bundles/kvasir_gaze (for the prediction).
        checkpoint: trained weights (default RUN_DIR/models/model.pt).
        model: a registered model instead, e.g. models:/kvasir_gaze@champion.
        metrics: an evaluation report (default: RUN_DIR's newest outputs/metrics_*.json).
        tracking_uri: MLflow store of the run and registry (default: the run record's).
        run_id: MLflow run for the curves (default: the run record's).
        preset: pseudo-mask parameters, kvasir or prostate.
        ids: images to draw, e.g. "[cju0qkwl35piu0993l0dewei2]" (default: SAMPLES chosen).
        samples: how many images to draw.
        seed: seed of the choice.
    """
    from .gaze.pseudo_masks import PRESETS
    from .report import write_report
    from .serve.staging import read_run_record
    from .train.run_record import inside

    if preset not in PRESETS:  # before any work, as pseudo-masks does
        raise InvalidInputError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    record = None
    if run_dir is not None:
        run = Path(_input_folder("run_dir", run_dir))
        checkpoint = checkpoint or (str(run / "models" / "model.pt") if model is None else None)
        record = read_run_record(run / "models" / "model.pt")
        if metrics is None:
            outputs = run / "outputs"  # no symlink out of the run folder (run_record.inside)
            found = sorted(outputs.glob("metrics_*.json"), key=lambda p: p.lstat().st_mtime)
            for p in [p for p in found if not inside(p, outputs)]:
                logger.warning("%s leads out of %s: not read", p, outputs)
            found = [p for p in found if inside(p, outputs)]
            metrics = str(found[-1]) if found else None
    if record is not None:
        tracking_uri = tracking_uri or record["tracking_uri"]
        run_id = run_id or record["run_id"]
    reads = {"dataset_dir": dataset_dir, "gaze_csv": gaze_csv, "metrics": metrics, "checkpoint": checkpoint}
    writes = ("samples", "curves.png", "dice.png", "report.html")
    result = write_report(
        out=_output_folder("out", out, inputs=reads, writes=writes),
        dataset_dir=_input_folder("dataset_dir", dataset_dir),
        gaze_csv=gaze_csv,
        preset=preset,
        ids=ids,
        samples=samples,
        seed=seed,
        checkpoint=checkpoint,
        bundle_dir=bundle_dir,
        model_uri=model,
        tracking_uri=tracking_uri,
        run_id=run_id,
        metrics=metrics,
    )
    print(f"report of {len(result['samples'])} images, {len(result['pictures'])} pictures: {result['html']}")
    print(json.dumps(result))


@_options(test_fraction=_number("in [0, 1)", lambda v: 0 <= v < 1), seed=_integer(0), test_patients=_texts)
def prepare_slices(
    out: str,
    nifti_images: str | None = None,
    nifti_masks: str | None = None,
    dicom_root: str | None = None,
    labels_root: str | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    test_patients=None,
):
    """Turn MR volumes into 2-D axial slices named <PatientID>_<slice> with gland masks and splits.

    Either NIfTI pairs (--nifti-images, --nifti-masks; Prostate158/MSD style, zonal labels) or the
    NCI-ISBI 2013 layout (--dicom-root with one DICOM series per <PatientID>/ folder, --labels-root
    with <PatientID>*.nrrd). Keeps slices containing gland (label > 0), writes OUT/images,
    OUT/masks, patient-disjoint OUT/train.txt and OUT/test.txt, and OUT/manifest.json.

    Args:
        out: output folder (a dataset folder for the prostate_gaze bundle).
        nifti_images: folder of image volumes (.nii, .nii.gz).
        nifti_masks: folder of label volumes matching them.
        dicom_root: folder with one sub-folder of DICOM files per patient.
        labels_root: folder of NRRD label volumes named by patient.
        test_fraction: share of patients held out in test.txt (seeded).
        seed: split seed.
        test_patients: comma-separated patient ids for test.txt instead of a seeded split.
    """
    from .prep.slices import nci_isbi_cases, nifti_cases
    from .prep.slices import prepare_slices as run

    nifti = nifti_images is not None or nifti_masks is not None
    dicom = dicom_root is not None or labels_root is not None
    if nifti == dicom:
        raise InvalidInputError(
            "give either --nifti-images and --nifti-masks, or --dicom-root and --labels-root"
        )
    if nifti and not (nifti_images and nifti_masks):
        raise InvalidInputError("--nifti-images and --nifti-masks go together")
    if dicom and not (dicom_root and labels_root):
        raise InvalidInputError("--dicom-root and --labels-root go together")
    reads = {"nifti_images": nifti_images, "nifti_masks": nifti_masks, "dicom_root": dicom_root}
    reads["labels_root"] = labels_root
    writes = ("images", "masks", "train.txt", "test.txt", "manifest.json")
    _output_folder("out", out, create=False, inputs=reads, writes=writes)  # made once every volume is read
    cases = nifti_cases(nifti_images, nifti_masks) if nifti else nci_isbi_cases(dicom_root, labels_root)
    summary = run(cases, out, test_fraction=test_fraction, seed=seed, test_patients=test_patients)
    print(
        f"prepared {summary['slices']} gland slices of {summary['patients']} patients: "
        f"train {summary['train_slices']} ({', '.join(summary['train_patients'])}), "
        f"test {summary['test_slices']} ({', '.join(summary['test_patients'])}) -> {out}"
    )
    print(json.dumps(summary))


def _manifest_cases(dataset_dir: Path, patients) -> list:
    """The :class:`VolumeCase` s of ``patients`` from a ``prepare-slices`` folder's manifest."""
    from .prep.slices import VolumeCase

    manifest = dataset_dir / "manifest.json"
    if not manifest.is_file():
        raise MissingInputError(
            f"{manifest} not found: --kind slices reads the volumes of a `gazemonai prepare-slices` folder"
        )
    cases = json.loads(manifest.read_text(encoding="utf-8")).get("cases", {})
    out = []
    for patient in patients:
        if patient not in cases:
            raise InvalidInputError(f"{manifest}: patient {patient} of train.txt has no entry under 'cases'")
        paths = []
        for key in ("image", "label"):
            given = Path(cases[patient][key])
            found = next((c for c in (given, dataset_dir / given) if c.exists()), None)
            if found is None:
                raise MissingInputError(
                    f"{manifest}: patient {patient}'s {key} volume {given} not found "
                    f"(from here or from {dataset_dir})"
                )
            paths.append(found)
        out.append(VolumeCase(patient, paths[0], paths[1]))
    return out


def _bound_crop_size(size: int) -> None:
    """Refuse a ``--size`` whose one crop cannot fit in memory (PIL holds 4 bytes a pixel)."""
    from .prep.limits import available_memory, check_memory

    available = available_memory()
    largest = math.isqrt(available // 4)
    check_memory("--size", size, 4.0 * size * size, "one crop", largest=largest, available=available)


@_options(
    val_fraction=_number(), seed=_integer(0), crop_fraction=_number(), min_cover=_number(), size=_integer(8)
)
def derive_image_labels(
    dataset_dir: str,
    out: str,
    kind: str = "crops",
    val_fraction: float | None = None,
    seed: int = 0,
    crop_fraction: float = 0.5,
    min_cover: float = 0.5,
    size: int = 128,
):
    """Make image-level labels (stage 1 of the image-label prompt) from a dataset's masks.

    Only the training images of the segmentation split are read: train.txt minus the seeded
    validation split the bundles use (--val-fraction, --seed), so stage 1 never sees a validation
    or test image.

    --kind crops (Kvasir-SEG-style DATASET_DIR/images, masks, train.txt): every image shows a
    polyp, so for each a square crop covering >= --min-cover of the polyp (class polyp) and one
    with no polyp pixel (class no_polyp) are cut, side --crop-fraction of the shorter side, chosen
    with the mask (seeded), written --size pixels square.

    --kind slices (a `gazemonai prepare-slices` folder): every axial slice of the training
    patients' volumes (not only those with gland), labelled gland / no_gland by the mask.

    Writes OUT/<class>/*.png, OUT/labels.csv (image,label,group) and OUT/manifest.json.

    Args:
        dataset_dir: the dataset folder.
        out: output folder (new or empty).
        kind: "crops" or "slices".
        val_fraction: the bundles' validation share (default 0.1 for crops, 0.34 of patients for
            slices, as kvasir_gaze and prostate_gaze).
        seed: the bundles' split seed, and the crops' placement seed.
        crop_fraction: crop side over the image's shorter side (crops).
        min_cover: share of the polyp a positive crop covers (crops).
        size: side of the written crops in pixels (crops).
    """
    from .prep.image_labels import derive_crop_labels, derive_slice_labels
    from .prep.slices import patient_of
    from .train.datalists import read_split, validation_split

    dataset_dir = Path(_input_folder("dataset_dir", dataset_dir))
    if kind not in ("crops", "slices"):
        raise InvalidInputError(f"--kind must be 'crops' or 'slices', got {kind!r}")
    if val_fraction is None:
        val_fraction = 0.1 if kind == "crops" else 0.34
    group = None if kind == "crops" else "patient"
    if kind == "slices" and not (dataset_dir / "manifest.json").is_file():
        raise MissingInputError(
            f"{dataset_dir / 'manifest.json'} not found: --kind slices reads the volumes of a "
            "`gazemonai prepare-slices` folder"
        )
    train_ids, val_ids = validation_split(read_split(dataset_dir, "train.txt"), val_fraction, seed, group)
    writes = ("labels.csv", "manifest.json", "polyp", "no_polyp", "gland", "no_gland")
    _output_folder("out", out, create=False, inputs={"dataset_dir": dataset_dir}, writes=writes)
    if kind == "crops":
        _bound_crop_size(size)
        summary = derive_crop_labels(
            dataset_dir,
            train_ids,
            out,
            crop_fraction=crop_fraction,
            min_cover=min_cover,
            size=size,
            seed=seed,
        )
        source = f"{len(train_ids)} training images (validation {len(val_ids)} left out)"
    else:
        patients = sorted({patient_of(i) for i in train_ids})
        summary = derive_slice_labels(_manifest_cases(dataset_dir, patients), out)
        held_out = ", ".join(sorted({patient_of(i) for i in val_ids}))
        source = f"training patients {', '.join(patients)} (validation {held_out} left out)"
    counts = ", ".join(f"{c} {n}" for c, n in summary["counts"].items())
    print(f"image labels from {source}: {counts} -> {out}")
    print(
        json.dumps({k: v for k, v in summary.items() if k not in ("no_polyp_free_crop", "no_covering_crop")})
    )


@_options(
    port=_integer(1, 65535),
    seed=_integer(0),
    speed=_number(),
    tracker_port=_integer(1, 65535),
    calibration_seconds=_number(),
    screen_width_cm=_number(),
    distance_cm=_number(),
)
def annotate(
    images: str | None = None,
    out: str | None = None,
    port: int = 8765,
    source: str = "pointer",
    annotator: str = "annotator",
    order: str = "name",
    seed: int = 0,
    again: bool = False,
    replay: str | None = None,
    events: str | None = None,
    speed: float = 1.0,
    tracker_host: str = "127.0.0.1",
    tracker_port: int = 4242,
    preset: str = "kvasir",
    calibration_seconds: float = 0.8,
    screen_width_cm: float | None = None,
    distance_cm: float = 60.0,
    server: str | None = None,
    strategy: str = "disagreement",
):
    """Record gaze on a folder of images: a local page shows them one after another; look, press Space.

    Opens http://127.0.0.1:PORT/ (a 9-point validation first, then each image full-screen; zoom with
    the wheel, pan by dragging; after each image its heatmap and pseudo-mask levels; R redoes it).
    Fixations go to OUT (GazeMedSeg columns + ANNOTATOR, RECORDING, ACCURACY_PX/DEG, SECONDS), one
    image at a time; raw samples and the page's events to OUT's folder, <OUT stem>_raw/.
    With --source replay --replay RAW --events EVENTS no page is served: the recording is made again.
    With --server URL (a MONAI Label server of apps/monailabel) the images come from its datastore
    (downloaded into <OUT stem>_images/), the next one picked by --strategy before each, and each
    image's rows are also saved there as its `gaze` label (refused or unreachable: kept in OUT, retried).

    Args:
        images: folder of images to annotate.
        out: the fixation CSV to append to (rows already there are kept).
        port: the page's port on 127.0.0.1.
        source: gaze source: pointer (the mouse stands in for gaze), gazepoint (Open Gaze API tracker),
            replay (a raw sample file, --replay).
        annotator: annotator id (rows of different annotators are kept apart; this annotator's images
            already in OUT are left out unless --again).
        order: name, random (with --seed) or a file of image names, one a line.
        seed: shuffle seed for --order random.
        again: show images this annotator already recorded in OUT too (their rows are replaced, the
            old ones kept in <OUT stem>.replaced.csv).
        replay: raw sample file for --source replay.
        events: a recording's events file (<recording>.events.jsonl): replay headless, no page.
        speed: replay speed (1 = as recorded).
        tracker_host: host of the Gazepoint Open Gaze API server (Gazepoint Control).
        tracker_port: Gazepoint server port.
        preset: pseudo-mask parameters of the overlay, kvasir or prostate.
        calibration_seconds: seconds of gaze taken at each validation point.
        screen_width_cm: the screen's width, for the validation accuracy in degrees.
        distance_cm: eye-to-screen distance for degrees.
        server: a MONAI Label server (http://host:port) to take the images from and save the gaze to.
        strategy: with --server: disagreement, entropy, first, random (the server's active learning)
            or listing (the datastore's images by name).
    """
    from .gaze.pseudo_masks import PRESETS
    from .record.fixations import require_pymovements
    from .record.server import AnnotationSession, replay_recording, serve
    from .record.sources import make_source

    require_pymovements()  # the optional extra gazemonai[record]: said now, not at the first key press

    if out is None:
        raise InvalidInputError("annotate needs --out CSV (the fixation file to write)")
    out = _output_file("out", out)
    if server is None and images is None:
        raise InvalidInputError("annotate needs --images DIR (a folder of images) or --server URL")
    if server is None:
        images = _input_folder("images", images)
    elif images is not None:
        raise InvalidInputError("--images goes without --server (the images come from its datastore)")
    if source not in ("pointer", "gazepoint", "replay"):
        raise InvalidInputError(f"--source must be pointer, gazepoint or replay, got {source!r}")
    if preset not in PRESETS:
        raise InvalidInputError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    options = {
        "annotator": annotator,
        "order": order,
        "seed": seed,
        "again": again,
        "config": PRESETS[preset],
        "calibration_point_s": calibration_seconds,
        "screen_width_cm": screen_width_cm,
        "distance_cm": distance_cm,
    }
    if source == "replay" and replay is None:
        raise InvalidInputError("--source replay needs --replay RAW.csv (a raw sample file)")
    if source != "replay" and (replay or events):
        raise InvalidInputError("--replay and --events go with --source replay")
    label_server = None
    if server is not None:
        from .record.labelserver import LabelServer

        if events is not None:
            raise InvalidInputError("--events (a headless replay) goes without --server")
        images = str(Path(out).with_name(Path(out).stem + "_images"))
        label_server = LabelServer(server, strategy, images)
        label_server.connect()  # a one-line error now when it does not answer or is not MONAI Label
        options["label_server"] = label_server
    if events is not None:
        if not Path(events).is_file():
            raise InvalidInputError(f"--events {events}: file not found")
        summary = replay_recording(images, out, replay, events, **options)
        print(f"replayed {len(summary['results'])} images into {out}")
        print(json.dumps({k: v for k, v in summary.items() if k != "results"}))
        return
    if source == "replay":
        gaze = make_source("replay", path=replay, speed=speed)
    elif source == "gazepoint":
        gaze = make_source("gazepoint", host=tracker_host, port=tracker_port)
    else:
        gaze = make_source("pointer")
    import socket

    with socket.socket() as probe:  # a clear message now, rather than uvicorn's exit after the set-up
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            raise InvalidInputError(f"--port {port}: cannot listen there ({e.strerror}); use another") from e
    session = AnnotationSession(images, out, gaze, **options)
    if session.already:
        n, who = len(session.already), session.annotator
        print(f"{n} images already in {out} for annotator {who}: left out (--again shows them)")
    if label_server is not None:
        print(f"images from {label_server.url} (strategy {label_server.strategy}), cached in {images}")
    summary = serve(session, port=port)
    print(json.dumps(summary))


COMMANDS = {
    "pseudo-masks": pseudo_masks,
    "simulate-gaze": simulate_gaze,
    "register": register,
    "evaluate": evaluate,
    "predict": predict,
    "export": export,
    "report": report,
    "segment-volume": segment_volume,
    "prepare-slices": prepare_slices,
    "derive-image-labels": derive_image_labels,
    "annotate": annotate,
}


def _see_help(command: str) -> str:
    return f"`gazemonai {command} --help` lists the options"


#: What fire reads as an option rather than a value: ``--name``, or ``-`` and a letter (``-5`` is a value).
_OPTION = re.compile(r"--|-[A-Za-z]")


def _check_flags(argv: list[str]) -> None:
    """Refuse what the command would not understand, before it runs: what declared types cannot do.

    fire runs a command with the arguments it recognised and complains about the others only
    afterwards (what is left is for the command's result, in a chain of calls), so a misspelled option
    or one argument too many would run a whole job with the defaults first. And it reads an option
    without its value (``--out`` last, or followed by another option) as ``--out True``, handing the
    declared type the text "True", the same as for a folder named True. Options are ``--name value``,
    ``--name=value``, ``--flag`` / ``--noflag`` for switches; the rest are the arguments in order.
    """
    if not argv or argv[0] not in COMMANDS:
        return
    command, params = argv[0], inspect.signature(COMMANDS[argv[0]]).parameters
    tokens, given, positional, i = argv[1:], set(), [], 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--" or token in ("--help", "-h"):  # fire's own flags, or help: fire's business
            return
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            negated = name not in params and name.startswith("no") and name[2:] in params
            if name not in params and not negated:
                close = difflib.get_close_matches(name, list(params), n=1)
                hint = f" (did you mean {_flag(close[0])}?)" if close else ""
                raise InvalidInputError(
                    f"{command}: unknown option {_flag(name)}{hint}; {_see_help(command)}"
                )
            target = name[2:] if negated else name
            given.add(target)
            following = tokens[i + 1] if i + 1 < len(tokens) else None
            if "=" not in token and not negated:
                if isinstance(params[target].default, bool):
                    i += following is not None and following.lower() in ("true", "false")
                elif following is None or _OPTION.match(following):
                    raise InvalidInputError(f"{command}: {_flag(target)} needs a value")
                else:
                    i += 1
        elif _OPTION.match(token):
            raise InvalidInputError(
                f"{command}: unknown option {token}; options are written --name (see --help)"
            )
        else:
            positional.append(token)
        i += 1
    free = [n for n in params if n not in given]
    if len(positional) > len(free):
        raise InvalidInputError(
            f"{command}: unexpected argument {positional[len(free)]!r}; {_see_help(command)}"
        )


def main(argv=None) -> None:
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _check_flags(argv)
        fire.Fire(COMMANDS, command=argv, name="gazemonai")
    except Exception as e:  # the user's input or settings; anything else is a bug: traceback
        cause = _input_error(e)  # MONAI wraps a transform's error in its own, several deep
        if cause is None:
            raise
        logger.debug("error details", exc_info=True)
        print(f"gazemonai: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from e


def _input_error(error: BaseException) -> GazemonaiError | None:
    """The :class:`GazemonaiError` that ``error`` is, or was raised from (``raise ... from``, any depth)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, GazemonaiError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


if __name__ == "__main__":
    main()
