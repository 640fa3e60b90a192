"""MONAI Label app for the gazemonai bundles (``kvasir_gaze``...): inference, training from gaze, next images.

Run in the MONAI Label environment (``make monailabel-env``; MONAI Label cannot share the main venv)::

    .venv-monailabel/bin/python -m monailabel.main start_server --app apps/monailabel \\
        --studies /path/to/images \\
        --conf models kvasir_gaze --conf checkpoint runs/gaze1/models/model.pt \\
        --conf overrides '{"image_size":[128,128]}'

Conf keys (``--conf KEY VALUE``):
    models: comma-separated bundle names under ``bundles_dir`` (default ``kvasir_gaze``).
    bundles_dir: folder of the bundles (default: this repository's ``bundles/``).
    checkpoint: weights to serve first for the (single) model; default ``<bundle>/models/model.pt``
        when it exists, else none: the server starts without a model, accepts gaze and trains the
        first one. A model trained by the app is kept across restarts (the checkpoint does not
        replace it; delete ``<workdir>/<name>`` to start over).
    overrides: JSON object of inference.json values the checkpoint was trained with (and the app's
        trainings use), written without spaces (MONAI Label's launcher re-splits its arguments on spaces).
    workdir: where the served bundles, the trainings' runs and their MLflow store live (default
        ``<app>/model``).
    train_python: the Python that runs the trainings (default: this repository's ``.venv/bin/python``).
    train: JSON object of the train task's default settings (``epochs``, ``batch_size``, ...; a
        ``POST /train/<model>`` body overrides them).
    tracking_uri: MLflow store of the trainings (default ``sqlite:///<workdir>/mlruns.db``).

Each bundle is staged (configs + checkpoint) under ``<workdir>/<name>`` and served by MONAI
Label's own ``BundleInferTask``, which runs the bundle's ``inference.json``: ``POST
/infer/kvasir_gaze?image=<id>`` returns the mask as a PNG (0 background, 1 polyp: the label values
``/info`` lists) at the image's size, whatever the image's format. Before a model exists ``/info``
lists none and ``/infer`` answers 409 saying how to train one.

The annotation loop (``gaze_datastore``, ``gaze_train``, ``gaze_strategies`` beside this file):
gaze saved per image as the label tag ``gaze`` (``PUT /datastore/label?image=<id>&tag=gaze``,
validated), ``POST /train/<name>`` trains on it and serves the new model when it is better on the
validation split, and ``POST /activelearning/disagreement`` (or ``entropy``) names the next image.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import monailabel
import numpy as np
from fastapi import HTTPException
from gaze_datastore import GazeDatastore
from gaze_strategies import FirstUnlabelled, RandomUnlabelled, UncertaintyStrategy
from gaze_train import GazeTrainTask
from monai.transforms import MapTransform, SaveImaged
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.tasks.infer.bundle import BundleInferTask

from gazemonai.serve.staging import stage_bundle
from gazemonai.train.run_record import check_plain_data

logger = logging.getLogger(__name__)

REPO_BUNDLES = Path(__file__).resolve().parents[2] / "bundles"
#: label value of the foreground in the masks the bundles write, by bundle
FOREGROUND = {"kvasir_gaze": "polyp", "prostate_gaze": "prostate"}
#: result formats that would change label values (MONAI Label's default is the input's format)
LOSSY = {".jpg", ".jpeg", ".jpe", ".jfif", ".webp"}


class MonaiLabelMaskd(MapTransform):
    """The bundle's (1, rows, cols) 0/1 mask as MONAI Label's writer takes a 2-D label.

    The bundles read images in (row, column) order (``PILReader(reverse_indexing=False)``, as the
    gaze coordinates are defined); MONAI Label's writer expects MONAI's default (x, y) order and
    transposes before writing. This drops the channel, hands it (x, y) and makes it ``uint8``.
    """

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            mask = np.asarray(d[key].detach().cpu() if hasattr(d[key], "detach") else d[key])
            if mask.ndim == 3:
                if mask.shape[0] != 1:
                    raise ValueError(f"expected a one-channel mask, got shape {mask.shape}")
                mask = mask[0]
            d[key] = np.ascontiguousarray(mask.T).astype(np.uint8)
        return d


class GazeBundleInferTask(BundleInferTask):
    """MONAI Label's ``BundleInferTask`` with the bundle's writer left out and a 0/1 ``uint8`` mask out."""

    def __init__(self, path: str, conf: dict, foreground: str):
        # Invertd in the bundle already restores the input size: no Restored
        super().__init__(path, conf, post_filter=[SaveImaged], add_post_restore=False)
        self.labels = {foreground: 1}

    def post_transforms(self, data=None):
        return list(super().post_transforms(data)) + [MonaiLabelMaskd(keys=self.key_pred)]

    def writer(self, data, extension=None, dtype=None):
        """Write the mask losslessly, with exactly the label values in ``/info``.

        MONAI Label writes a result in its input's format unless told otherwise: a JPEG for a
        Kvasir ``.jpg``, whose compression invents label values and moves edges. A 2-D mask is a
        ``uint8`` PNG here, unless the request asks for another lossless format (``result_extension``
        such as ``.nii.gz``); a lossy one asked for (``.jpg``) is replaced by PNG, with a warning.
        """
        asked = extension or data.get("result_extension")
        if not asked or str(asked).lower() in LOSSY:
            if asked:
                logger.warning("result_extension %s is lossy: the mask is written as PNG", asked)
            asked = ".png"
        return super().writer(data, extension=asked, dtype=dtype or "uint8")


class GazeInferTask(InferTask):
    """The served bundle's inference once a model exists; a clear 409 answer before that.

    Built lazily, so a server started with no model offers ``infer`` as soon as the first training
    has written ``models/model.pt`` (MONAI Label's task reloads the weights when that file changes).
    """

    def __init__(self, path: str, conf: dict, name: str, foreground: str):
        super().__init__(
            type="segmentation", labels={foreground: 1}, dimension=2,
            description=f"{name}: no trained model yet (POST /train/{name} trains one from the saved gaze)",
        )  # fmt: skip
        self.path, self.conf, self.name, self.foreground = Path(path), conf, name, foreground
        self._task: GazeBundleInferTask | None = None

    def task(self) -> GazeBundleInferTask | None:
        if self._task is None and (self.path / "models" / "model.pt").is_file():
            task = GazeBundleInferTask(str(self.path), self.conf, self.foreground)
            if not task.is_valid():
                raise RuntimeError(f"MONAI Label cannot load bundle {self.name} from {self.path}")
            self._task = task
            self.description = task.description
        return self._task

    def is_valid(self) -> bool:
        return (self.path / "models" / "model.pt").is_file()

    def info(self):
        task = self.task()
        return task.info() if task else super().info()

    def config(self):
        task = self.task()
        return task.config() if task else {}

    def __call__(self, request):
        task = self.task()
        if task is None:
            raise HTTPException(
                status_code=409,
                detail=f"no trained model for {self.name} yet: save gaze for some images "
                f"(PUT /datastore/label?image=<id>&tag=gaze), then POST /train/{self.name} "
                "(progress: GET /train)",
            )
        return task(request)


def sync_configs(bundle: Path, dest: Path, overrides: dict | None) -> None:
    """``dest/configs`` = ``bundle/configs``, ``overrides`` in ``inference.json``; same files untouched."""
    (dest / "configs").mkdir(parents=True, exist_ok=True)
    for src in sorted((bundle / "configs").iterdir()):
        if not src.is_file():
            continue
        data = src.read_bytes()
        if src.name == "inference.json" and overrides:
            config = json.loads(data)
            unknown = sorted(set(overrides) - set(config))
            if unknown:
                raise ValueError(f"overrides {unknown} are not keys of {src}")
            for key, value in overrides.items():  # data only: MONAI would evaluate a '$...' value
                check_plain_data(value, f"--conf overrides {key}")
            data = (json.dumps({**config, **overrides}, indent=4) + "\n").encode()
        target = dest / "configs" / src.name
        if not target.is_file() or target.read_bytes() != data:
            tmp = target.with_name(f".{src.name}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)


def stage_served(bundle: Path, dest: Path, checkpoint: Path | None, overrides: dict | None) -> str:
    """Stage the served bundle ``dest``; returns what it serves (for the log).

    A model trained by the app (``models/served.json`` says ``train``) is kept; otherwise
    ``checkpoint`` is served (copied when it is not the one already there); with neither, the
    configs alone (no model yet).
    """
    record = dest / "models" / "served.json"
    source = None
    if record.is_file():
        try:
            source = json.loads(record.read_text()).get("source")
        except ValueError:
            source = None
    model = dest / "models" / "model.pt"
    if source == "train" and model.is_file():
        if checkpoint:
            logger.warning("serving the model trained in %s, not --conf checkpoint %s", dest, checkpoint)
        sync_configs(bundle, dest, overrides)
        return "the model trained by the app"
    if checkpoint:
        if source != str(checkpoint) or not model.is_file():
            stage_bundle(bundle, dest, checkpoint, overrides)
            record.write_text(json.dumps({"source": str(checkpoint)}) + "\n")
        sync_configs(bundle, dest, overrides)
        return str(checkpoint)
    if model.is_file() and source is None:
        model.unlink()  # an older staging's copy of a checkpoint no longer asked for
    sync_configs(bundle, dest, overrides)
    return "no model yet"


class GazeMonaiApp(MONAILabelApp):
    """Serves gaze-supervised bundles, trains them from gaze saved in the datastore, picks next images."""

    def __init__(self, app_dir, studies, conf):
        bundles_dir = Path(conf.get("bundles_dir", REPO_BUNDLES))
        names = [m.strip() for m in conf.get("models", "kvasir_gaze").split(",") if m.strip()]
        checkpoint = conf.get("checkpoint")
        if checkpoint and len(names) != 1:
            raise ValueError(f"--conf checkpoint serves one model, but models lists {names}")
        overrides = json.loads(conf["overrides"]) if conf.get("overrides") else None
        self.workdir = Path(conf.get("workdir") or Path(app_dir) / "model").resolve()
        self.bundles = {name: bundles_dir / name for name in names}
        self.models = {}
        for name, bundle in self.bundles.items():
            ckpt = Path(checkpoint) if checkpoint else bundle / "models" / "model.pt"
            staged = self.workdir / name
            served = stage_served(bundle, staged, ckpt.resolve() if ckpt.is_file() else None, overrides)
            if checkpoint and not ckpt.is_file():
                raise FileNotFoundError(f"--conf checkpoint {checkpoint}: no such file")
            logger.info("+++ bundle %s staged at %s, serving %s", name, staged, served)
            self.models[name] = str(staged)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"gazemonai - gaze-supervised bundles (MONAI Label {monailabel.__version__})",
            description="Segmentation models trained from eye-tracking gaze (GazeSup, MICCAI 2024)",
            version=monailabel.__version__,
        )

    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        from monailabel.config import settings

        return GazeDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, InferTask]:
        return {
            name: GazeInferTask(path, self.conf, name, FOREGROUND.get(name, "foreground"))
            for name, path in self.models.items()
        }

    def init_trainers(self):
        defaults = json.loads(self.conf["train"]) if self.conf.get("train") else None
        return {
            name: GazeTrainTask(
                name,
                self.bundles[name],
                path,
                self.workdir,
                train_python=self.conf.get("train_python"),
                defaults=defaults,
                tracking_uri=self.conf.get("tracking_uri"),
            )  # fmt: skip
            for name, path in self.models.items()
        }

    def init_strategies(self):
        served = next(iter(self.models.values()))  # the first model listed
        return {
            "disagreement": UncertaintyStrategy(served, "disagreement"),
            "entropy": UncertaintyStrategy(served, "entropy"),
            "random": RandomUnlabelled(),
            "first": FirstUnlabelled(),
        }
