"""Active learning: the next image to look at, by the served model's uncertainty.

``POST /activelearning/disagreement`` (the level networks' disagreement) or ``/activelearning/entropy``
(the ensemble's predictive entropy; :mod:`gazemonai.serve.uncertainty`) runs the served model on every
image that has no label yet (neither ``gaze`` nor a mask) and answers the one scoring highest
(``{"id", "score", "strategy", "scores": {id: score}}`` plus MONAI Label's image info). Scores are
cached per image until the served model changes. With no model served yet, the first unlabelled
image (in name order) is answered, with ``"reason"`` saying so; with none left, ``{}``. ``first`` and
``random`` replace MONAI Label's own, which count only masks as labels.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from pathlib import Path

import torch
from gaze_train import read_model_weights
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.strategy import Strategy

from gazemonai.serve.uncertainty import SCORES

logger = logging.getLogger(__name__)


def unlabelled(datastore) -> list[str]:
    """Images with neither gaze nor a mask, by name (MONAI Label's own strategies see masks only)."""
    return sorted(
        i for i in datastore.list_images() if not {"gaze", "final"} & set(datastore.get_labels_by_image_id(i))
    )


class FirstUnlabelled(Strategy):
    """The first image (by name) with neither gaze nor a mask."""

    def __init__(self):
        super().__init__("First image with neither gaze nor a mask")

    def __call__(self, request, datastore):
        candidates = unlabelled(datastore)
        return {"id": candidates[0]} if candidates else {}


class RandomUnlabelled(Strategy):
    """A random image with neither gaze nor a mask."""

    def __init__(self):
        super().__init__("Random image with neither gaze nor a mask")

    def __call__(self, request, datastore):
        candidates = unlabelled(datastore)
        return {"id": random.choice(candidates)} if candidates else {}


class UncertaintyStrategy(Strategy):
    """Picks the unlabelled image the served multi-level model is least sure of.

    Args:
        served: the served bundle folder (``configs/inference.json``, ``models/model.pt``).
        score: ``"disagreement"`` or ``"entropy"`` (:data:`gazemonai.serve.uncertainty.SCORES`).
    """

    def __init__(self, served: str | os.PathLike, score: str):
        super().__init__(
            {
                "disagreement": "Unlabelled image where the level networks disagree most",
                "entropy": "Unlabelled image with the highest predictive entropy",
            }[score]
        )
        self.served = Path(served)
        self.score = score
        self._model = None  # (mtime, network, preprocessing)
        self._cache: dict[tuple[str, float], float] = {}
        self._lock = threading.Lock()

    def _network(self, model: Path):
        mtime = model.stat().st_mtime
        if self._model is None or self._model[0] != mtime:
            parser = ConfigParser()
            parser.read_config(str(self.served / "configs" / "inference.json"))
            parser["device"] = "cpu"
            network = parser.get_parsed_content("network_def")
            network.load_state_dict(read_model_weights(model))
            network.eval()
            self._model = (mtime, network, parser.get_parsed_content("preprocessing"))
            self._cache.clear()
        return self._model

    def __call__(self, request, datastore):
        candidates = sorted(
            i
            for i in datastore.list_images()
            if not {"gaze", "final"} & set(datastore.get_labels_by_image_id(i))
        )
        if not candidates:
            return {}
        model = self.served / "models" / "model.pt"
        if not model.is_file():
            return {"id": candidates[0], "strategy": self.score,
                    "reason": "no model trained yet: the first unlabelled image"}  # fmt: skip
        with self._lock, torch.no_grad():
            mtime, network, preprocessing = self._network(model)
            scores = {}
            for image_id in candidates:
                key = (image_id, mtime)
                if key not in self._cache:
                    x = preprocessing({"image": datastore.get_image_uri(image_id)})["image"]
                    stack = network(torch.as_tensor(x)[None].float(), output="stack")
                    self._cache[key] = float(SCORES[self.score](stack)[0])
                scores[image_id] = self._cache[key]
        best = max(candidates, key=lambda i: (scores[i], i))
        logger.info(
            "%s: next image %s (score %.4f of %d unlabelled)", self.score, best, scores[best], len(scores)
        )
        return {"id": best, "score": scores[best], "strategy": self.score, "scores": scores}
