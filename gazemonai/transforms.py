"""MONAI transforms that turn fixations into pseudo-masks inside a data pipeline.

The chain, on a data dictionary that holds a channel-first ``image`` (C, H, W) and its ``fixations``
((N, 3) array of normalised x, y and duration in ms)::

    GazeHeatmapd(keys="fixations", image_key="image")          -> d["heatmap"]      (1, H, W)
    CRFRefined(keys="heatmap", image_key="image")              -> d["refined"]      (1, H, W)
    PseudoMaskLevelsd(keys="refined", thresholds=(0.5, 0.3))   -> d["pseudo_label"] (N, H, W)

so a bundle can compute pseudo-masks on the fly (put them before any spatial augmentation; cache
them with ``CacheDataset``/``PersistentDataset``), or read pseudo-masks that ``gazemonai
pseudo-masks`` wrote (``LoadImaged`` of the ``level_k`` PNGs + ``ConcatItemsd``).

Spatial axes: rows are y and columns are x, i.e. images loaded as (C, H, W) — with MONAI's
``PILReader(reverse_indexing=False)`` for PNG/JPEG. MONAI's default PIL/ITK readers give (C, W, H);
pass ``xy_transposed=True`` for those.

Reference: Zhong et al., "Weakly-supervised Medical Image Segmentation with Gaze Annotations",
MICCAI 2024.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from .gaze.heatmap import DEFAULT_CANVAS, KVASIR_SIGMA, gaze_heatmap
from .gaze.levels import KVASIR_THRESHOLDS, pseudo_mask_levels
from .gaze.refine import CRF_DEFAULTS, crf_refine

__all__ = [
    "GazeHeatmap",
    "GazeHeatmapd",
    "CRFRefine",
    "CRFRefined",
    "PseudoMaskLevels",
    "PseudoMaskLevelsd",
    "BinarizeMaskd",
    "SaveMaskd",
]


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _like(arr: np.ndarray, ref) -> torch.Tensor:
    """A float tensor of ``arr`` carrying ``ref``'s metadata when ``ref`` is a MetaTensor."""
    t = torch.as_tensor(np.ascontiguousarray(arr))
    if isinstance(ref, MetaTensor):
        return MetaTensor(t, meta=dict(ref.meta), applied_operations=list(ref.applied_operations))
    return t


def _hw(image, xy_transposed: bool) -> tuple[int, int]:
    shape = tuple(_numpy(image).shape if not isinstance(image, torch.Tensor) else image.shape)
    if len(shape) != 3:
        raise ValueError(f"image must be channel-first (C, H, W), got shape {shape}")
    h, w = shape[1], shape[2]
    return (w, h) if xy_transposed else (h, w)


def _channel_last(image, xy_transposed: bool) -> np.ndarray:
    a = _numpy(image)
    if a.ndim != 3:
        raise ValueError(f"image must be channel-first (C, H, W), got shape {a.shape}")
    a = np.moveaxis(a, 0, -1)
    return a.transpose(1, 0, 2) if xy_transposed else a


class GazeHeatmap(Transform):
    """Fixations -> duration-weighted Gaussian heatmap of shape (1, H, W) in [0, 1].

    Args:
        sigma: Gaussian sigma on the canvas (Kvasir-SEG 70, NCI-ISBI 50).
        canvas: (height, width) of the canvas fixations are drawn on.
        weight: ``"duration"`` or ``"count"``.
        mode: ``"fast"`` (default) or ``"reference"``; see :func:`gazemonai.gaze.heatmap.gaze_heatmap`.
    """

    def __init__(
        self,
        sigma: float = KVASIR_SIGMA,
        canvas: Sequence[int] = DEFAULT_CANVAS,
        weight: str = "duration",
        mode: str = "fast",
    ) -> None:
        self.sigma = float(sigma)
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.weight = weight
        self.mode = mode

    def __call__(self, fixations, spatial_size: Sequence[int]) -> np.ndarray:
        """``spatial_size`` is (H, W); returns a (1, H, W) float32 array."""
        hm = gaze_heatmap(
            _numpy(fixations), tuple(spatial_size), self.sigma, self.canvas, self.weight, self.mode
        )
        return hm[None]


class GazeHeatmapd(MapTransform):
    """Dictionary wrapper of :class:`GazeHeatmap`, sized to ``d[image_key]``.

    Args:
        keys: key of the (N, 3) fixation array (one key).
        image_key: key of the channel-first image whose size the heatmap takes.
        heatmap_key: key to store the (1, H, W) heatmap under.
        xy_transposed: the image's spatial axes are (W, H) (MONAI's default PIL/ITK reading).
        allow_missing_keys: don't raise when the fixation key is absent.
        other args: see :class:`GazeHeatmap`.
    """

    def __init__(
        self,
        keys: KeysCollection = "fixations",
        image_key: str = "image",
        heatmap_key: str = "heatmap",
        sigma: float = KVASIR_SIGMA,
        canvas: Sequence[int] = DEFAULT_CANVAS,
        weight: str = "duration",
        mode: str = "fast",
        xy_transposed: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("GazeHeatmapd takes exactly one fixation key")
        self.image_key = image_key
        self.heatmap_key = heatmap_key
        self.xy_transposed = xy_transposed
        self.heatmap = GazeHeatmap(sigma, canvas, weight, mode)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[self.image_key]
            hm = self.heatmap(d[key], _hw(image, self.xy_transposed))
            if self.xy_transposed:
                hm = hm.transpose(0, 2, 1)
            d[self.heatmap_key] = _like(hm, image)
        return d


class CRFRefine(Transform):
    """Heatmap + image -> dense-CRF refined foreground probability, (1, H, W) in [0, 1].

    Args:
        sxy: bilateral spatial sigma in full-resolution pixels (recipe: 80).
        srgb: bilateral intensity sigma (recipe: 13).
        compat: Potts weight (recipe: 1).
        iterations: mean-field iterations (recipe: 10).
        max_side: CRF working resolution (longer side); ``None`` = full resolution.
    """

    def __init__(
        self,
        sxy: float = CRF_DEFAULTS["sxy"],
        srgb: float = CRF_DEFAULTS["srgb"],
        compat: float = CRF_DEFAULTS["compat"],
        iterations: int = CRF_DEFAULTS["iterations"],
        max_side: int | None = 160,
    ) -> None:
        self.kwargs = {
            "sxy": sxy,
            "srgb": srgb,
            "compat": compat,
            "iterations": iterations,
            "max_side": max_side,
        }

    def __call__(self, heatmap, image, xy_transposed: bool = False) -> np.ndarray:
        """``heatmap`` (1, H, W), ``image`` channel-first (C, H, W) (RGB, or one channel for MR)."""
        hm = _numpy(heatmap)
        if hm.ndim == 3:
            hm = hm[0]
        img = _channel_last(image, xy_transposed)
        if xy_transposed:
            hm = hm.T
        out = crf_refine(img, hm, **self.kwargs)
        return (out.T if xy_transposed else out)[None]


class CRFRefined(MapTransform):
    """Dictionary wrapper of :class:`CRFRefine`.

    Args:
        keys: key of the heatmap (one key).
        image_key: key of the channel-first image.
        refined_key: key to store the refined map under.
        xy_transposed: the spatial axes are (W, H).
        allow_missing_keys: don't raise when the heatmap key is absent.
        other args: see :class:`CRFRefine`.
    """

    def __init__(
        self,
        keys: KeysCollection = "heatmap",
        image_key: str = "image",
        refined_key: str = "refined",
        sxy: float = CRF_DEFAULTS["sxy"],
        srgb: float = CRF_DEFAULTS["srgb"],
        compat: float = CRF_DEFAULTS["compat"],
        iterations: int = CRF_DEFAULTS["iterations"],
        max_side: int | None = 160,
        xy_transposed: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("CRFRefined takes exactly one heatmap key")
        self.image_key = image_key
        self.refined_key = refined_key
        self.xy_transposed = xy_transposed
        self.refine = CRFRefine(sxy, srgb, compat, iterations, max_side)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            out = self.refine(d[key], d[self.image_key], self.xy_transposed)
            d[self.refined_key] = _like(out, d[key])
        return d


class PseudoMaskLevels(Transform):
    """Refined map (1, H, W) -> N binary pseudo-masks (N, H, W), level i = map >= thresholds[i].

    Args:
        thresholds: one per level (Kvasir-SEG 0.5, 0.3; prostate 0.2, 0.4).
    """

    def __init__(self, thresholds: Sequence[float] = KVASIR_THRESHOLDS) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)

    def __call__(self, prob) -> np.ndarray:
        return pseudo_mask_levels(_numpy(prob), self.thresholds).astype(np.float32)


class PseudoMaskLevelsd(MapTransform):
    """Dictionary wrapper of :class:`PseudoMaskLevels`.

    Args:
        keys: key of the refined map (one key).
        label_key: key to store the (N, H, W) pseudo-masks under.
        thresholds: one per level.
        allow_missing_keys: don't raise when the key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "refined",
        label_key: str = "pseudo_label",
        thresholds: Sequence[float] = KVASIR_THRESHOLDS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("PseudoMaskLevelsd takes exactly one key")
        self.label_key = label_key
        self.levels = PseudoMaskLevels(thresholds)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.label_key] = _like(self.levels(d[key]), d[key])
        return d


class BinarizeMaskd(MapTransform):
    """Channel-first mask -> (1, H, W) float 0/1: the maximum over channels above ``threshold``.

    JPEG masks such as Kvasir-SEG's are stored as noisy 0/255 RGB (threshold 127); masks whose
    values are all <= 1 are taken as 0/1 label maps (foreground > 0).

    Args:
        keys: mask keys.
        threshold: foreground threshold for 0-255 masks.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self, keys: KeysCollection = "label", threshold: float = 127.0, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            m = d[key]
            t = m if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m))
            if t.dim() < 3:
                raise ValueError(f"{key}: expected a channel-first mask, got shape {tuple(t.shape)}")
            t = t.amax(dim=0, keepdim=True)
            thr = 0.0 if float(t.max()) <= 1.0 else self.threshold
            out = (t > thr).to(torch.float32)
            if isinstance(m, MetaTensor):
                out = MetaTensor(out.as_tensor() if isinstance(out, MetaTensor) else out, meta=dict(m.meta))
            d[key] = out
        return d


class SaveMaskd(MapTransform):
    """Write a binary (1, H, W) prediction as an 8-bit 0/255 PNG named after its source image.

    ``OUTPUT_DIR/<stem of d[source_key]'s filename>.png``, rows = y as read with
    ``PILReader(reverse_indexing=False)``; the prediction is expected at the input image's size
    (invert the resizing first, e.g. with ``Invertd``).

    Args:
        keys: prediction key (one).
        output_dir: output folder (created).
        source_key: key whose ``filename_or_obj`` metadata names the file.
        allow_missing_keys: don't raise when the key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        output_dir: str = "./eval",
        source_key: str = "image",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.output_dir = output_dir
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        import os

        from .io import write_png

        d = dict(data)
        src = d.get(self.source_key)
        meta = getattr(src, "meta", {}) or {}
        name = meta.get("filename_or_obj")
        if not name:
            raise ValueError(
                f"{self.source_key} carries no filename_or_obj metadata to name the output after"
            )
        stem = os.path.splitext(os.path.basename(str(name)))[0]
        for key in self.key_iterator(d):
            m = _numpy(d[key])
            if m.ndim == 3:
                m = m[0]
            write_png(os.path.join(self.output_dir, f"{stem}.png"), m > 0.5)
        return d
