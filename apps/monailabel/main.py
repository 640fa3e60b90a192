"""MONAI Label app serving the gazemonai bundles (``kvasir_gaze``, ...) for interactive inference.

Run in the MONAI Label environment (``make monailabel-env``; MONAI Label cannot share the main venv)::

    .venv-monailabel/bin/python -m monailabel.main start_server --app apps/monailabel \\
        --studies /path/to/images \\
        --conf models kvasir_gaze --conf checkpoint runs/gaze1/models/model.pt \\
        --conf overrides '{"image_size":[128,128]}'

Conf keys (``--conf KEY VALUE``):
    models: comma-separated bundle names under ``bundles_dir`` (default ``kvasir_gaze``).
    bundles_dir: folder of the bundles (default: this repository's ``bundles/``).
    checkpoint: trained weights for the (single) model; default ``<bundle>/models/model.pt``.
    overrides: JSON object of inference.json values the checkpoint was trained with, written
        without spaces (MONAI Label's launcher re-splits its arguments on spaces).

Each bundle is staged (configs + checkpoint) under ``<app>/model/<name>`` and served by MONAI
Label's own ``BundleInferTask``, which runs the bundle's ``inference.json``: ``POST
/infer/kvasir_gaze?image=<id>`` returns the mask as a PNG (0 background, 1 polyp: the label values
``/info`` lists) at the image's size, whatever the image's format.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import monailabel
import numpy as np
from monai.transforms import MapTransform, SaveImaged
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from monailabel.tasks.infer.bundle import BundleInferTask

from gazemonai.serve.staging import stage_bundle
from gazemonai.train.transforms import SaveMaskd

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
        super().__init__(path, conf, post_filter=[SaveImaged, SaveMaskd], add_post_restore=False)
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


class GazeMonaiApp(MONAILabelApp):
    """Serves gaze-supervised bundles; their inference.json's own pre/post-processing runs as is."""

    def __init__(self, app_dir, studies, conf):
        bundles_dir = Path(conf.get("bundles_dir", REPO_BUNDLES))
        names = [m.strip() for m in conf.get("models", "kvasir_gaze").split(",") if m.strip()]
        checkpoint = conf.get("checkpoint")
        if checkpoint and len(names) != 1:
            raise ValueError(f"--conf checkpoint serves one model, but models lists {names}")
        overrides = json.loads(conf["overrides"]) if conf.get("overrides") else None
        self.models = {}
        for name in names:
            staged = stage_bundle(bundles_dir / name, Path(app_dir) / "model" / name, checkpoint, overrides)
            logger.info("+++ staged bundle %s (%s) at %s", name, checkpoint or "its models/model.pt", staged)
            self.models[name] = str(staged)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"gazemonai - gaze-supervised bundles (MONAI Label {monailabel.__version__})",
            description="Segmentation models trained from eye-tracking gaze (GazeSup, MICCAI 2024)",
            version=monailabel.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {}
        for name, path in self.models.items():
            task = GazeBundleInferTask(path, self.conf, FOREGROUND.get(name, "foreground"))
            if not task.is_valid():
                raise RuntimeError(f"MONAI Label cannot load bundle {name} from {path}")
            infers[name] = task
        return infers

    def init_strategies(self):
        return {"random": Random(), "first": First()}
