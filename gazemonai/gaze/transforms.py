"""The gaze -> pseudo-mask chain as MONAI transforms, for use inside a data pipeline.

On a data dictionary that holds a channel-first ``image`` and its ``fixations`` ((N, 3) array of
normalised x, y and duration in ms)::

    GazeHeatmapd(keys="fixations", image_key="image")          -> d["heatmap"]      (1, H, W)
    CRFRefined(keys="heatmap", image_key="image")              -> d["refined"]      (1, H, W)
    PseudoMaskLevelsd(keys="refined", thresholds=(0.5, 0.3))   -> d["pseudo_label"] (N, H, W)

so a bundle can compute pseudo-masks on the fly (put them before any spatial augmentation; cache
them with ``CacheDataset``/``PersistentDataset``), or read pseudo-masks that ``gazemonai
pseudo-masks`` wrote (``LoadImaged`` of the ``level_k`` PNGs + ``ConcatItemsd``).

Axis order: fixations are (x, y) positions on the image as displayed, and :class:`GazeHeatmapd` is
the one place where they meet the image array, so it is the one place that needs to know the
array's axis order. By default the spatial axes are (rows = y, columns = x), as MONAI's
``PILReader(reverse_indexing=False)`` loads PNG/JPEG; MONAI's default PIL/ITK readers give (x, y):
pass ``xy_transposed=True`` to :class:`GazeHeatmapd` for those (for a non-square image read by
``PILReader``, the file's width and height tell, and a wrong setting is an error). The heatmap comes
out in the image array's own axis order and records it in its metadata (``meta["spatial_axes"]``:
``"yx"`` or ``"xy"``), which the later maps inherit. :class:`CRFRefined` reads it there: the dense
CRF's permutohedral lattice is not exactly symmetric in x and y, so it runs on the image as
displayed and the result is the same, to rounding, whichever way the image was read. (A heatmap
that did not come from :class:`GazeHeatmapd`, e.g. one read back from the CLI's PNGs with an (x, y)
reader, records no order and is taken as (y, x): set ``meta["spatial_axes"] = "xy"`` on it, or the
CRF runs on the transposed image, which differs by up to ~0.02 on a few pixels.) The maps are
MetaTensors, also for a plain-array image, unless MONAI's metadata tracking is off.

Each dictionary transform takes several keys, as MONAI's do: per-key settings (``image_key``, the
output key) are a single value or one value per key, and the outputs must be distinct.

Reference: Zhong et al., "Weakly-supervised Medical Image Segmentation with Gaze Annotations",
MICCAI 2024.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Resize, Transform
from monai.utils import ensure_tuple_rep

from ..errors import InvalidInputError
from .heatmap import DEFAULT_CANVAS, KVASIR_SIGMA, gaze_heatmap
from .levels import KVASIR_THRESHOLDS, pseudo_mask_levels
from .refine import CRF_DEFAULTS, crf_refine

__all__ = [
    "SPATIAL_AXES",
    "GazeHeatmap",
    "GazeHeatmapd",
    "CRFRefine",
    "CRFRefined",
    "PseudoMaskLevels",
    "PseudoMaskLevelsd",
]


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


#: Metadata key of a map's spatial axis order: ``"yx"`` (rows are y, the default) or ``"xy"``.
SPATIAL_AXES = "spatial_axes"


def _like(arr: np.ndarray, ref, **meta) -> torch.Tensor:
    """A tensor of ``arr`` carrying ``ref``'s metadata (when ``ref`` is a MetaTensor) updated with ``meta``.

    With ``meta``, a plain ``ref`` gives a MetaTensor too (unless MONAI's metadata tracking is off).
    """
    t = torch.as_tensor(np.ascontiguousarray(arr))
    if isinstance(ref, MetaTensor):
        return MetaTensor(t, meta={**ref.meta, **meta}, applied_operations=list(ref.applied_operations))
    if meta and get_track_meta():
        return MetaTensor(t, meta=meta)
    return t


def _axes(array) -> str:
    """The spatial axis order a map records (:data:`SPATIAL_AXES`); ``"yx"`` when it records none."""
    axes = (getattr(array, "meta", None) or {}).get(SPATIAL_AXES, "yx")
    if axes not in ("yx", "xy"):
        raise InvalidInputError(f"meta[{SPATIAL_AXES!r}] must be 'yx' or 'xy', got {axes!r}")
    return axes


def _spatial_2d(image) -> tuple[int, int]:
    shape = tuple(image.shape) if isinstance(image, torch.Tensor) else np.shape(image)
    if len(shape) != 3:
        raise InvalidInputError(f"image must be channel-first (C, H, W), got shape {tuple(shape)}")
    return int(shape[1]), int(shape[2])


def _check_axes(image, image_key, xy_transposed: bool) -> None:
    """Refuse an image whose file says it is W wide and H high but whose array is the other way round.

    MONAI's ``PILReader`` records the file's ``width`` and ``height``; for a non-square image they
    tell which array axis is x. (Square images, and images read without that metadata, can't be
    checked.)
    """
    meta = getattr(image, "meta", None) or {}
    if "width" not in meta or "height" not in meta:
        return
    w, h = int(meta["width"]), int(meta["height"])
    spatial = _spatial_2d(image)
    as_said = (w, h) if xy_transposed else (h, w)
    if w != h and spatial != as_said and spatial == as_said[::-1]:
        order, reader = (
            ("(y, x)", "PILReader(reverse_indexing=False)") if xy_transposed else ("(x, y)", "default")
        )
        raise InvalidInputError(
            f"{image_key}: the image file is {w} wide and {h} high but its array's spatial axes are "
            f"{spatial[0]} x {spatial[1]}, i.e. {order} as MONAI's {reader} reader loads it: "
            f"set xy_transposed={not xy_transposed} on GazeHeatmapd"
        )


def _per_key(transform: MapTransform, name: str, value, outputs: bool = False) -> tuple:
    """``value`` repeated or matched to the transform's keys (MONAI's per-key settings)."""
    values = ensure_tuple_rep(value, len(transform.keys))
    if outputs and len(set(values)) != len(values):
        raise InvalidInputError(
            f"{type(transform).__name__}: {len(transform.keys)} keys {list(transform.keys)} need distinct "
            f"{name} values (one per key), got {list(values)}"
        )
    return values


class GazeHeatmap(Transform):
    """Fixations -> duration-weighted Gaussian heatmap of shape (1, *spatial_size) in [0, 1].

    Args:
        sigma: Gaussian sigma on the canvas (Kvasir-SEG 70, NCI-ISBI 50).
        canvas: (height, width) of the canvas fixations are drawn on.
        weight: ``"duration"`` or ``"count"``.
        mode: ``"fast"`` (default) or ``"reference"``; see :func:`gazemonai.gaze.heatmap.gaze_heatmap`.
        xy_transposed: the image array's spatial axes are (x, y) (MONAI's default PIL/ITK reading):
            the heatmap is made on the image as displayed and returned in the array's axis order.
    """

    def __init__(
        self,
        sigma: float = KVASIR_SIGMA,
        canvas: Sequence[int] = DEFAULT_CANVAS,
        weight: str = "duration",
        mode: str = "fast",
        xy_transposed: bool = False,
    ) -> None:
        self.sigma = float(sigma)
        self.canvas = (int(canvas[0]), int(canvas[1]))
        self.weight = weight
        self.mode = mode
        self.xy_transposed = bool(xy_transposed)

    def __call__(self, fixations, spatial_size: Sequence[int]) -> np.ndarray:
        """``spatial_size``: the image array's spatial shape; returns a (1, *spatial_size) float32 array."""
        size = tuple(int(s) for s in spatial_size)
        if self.xy_transposed:
            size = size[::-1]
        hm = gaze_heatmap(_numpy(fixations), size, self.sigma, self.canvas, self.weight, self.mode)
        return np.ascontiguousarray(hm.T if self.xy_transposed else hm)[None]


class GazeHeatmapd(MapTransform):
    """Dictionary wrapper of :class:`GazeHeatmap`, sized to ``d[image_key]``.

    Args:
        keys: keys of (N, 3) fixation arrays (e.g. one per reader).
        image_key: key(s) of the channel-first image whose size the heatmap takes (one, or one per key).
        heatmap_key: key(s) to store the (1, H, W) heatmaps under (one per key).
        xy_transposed: the images' spatial axes are (x, y) (MONAI's default PIL/ITK reading).
        allow_missing_keys: don't raise when a fixation key is absent.
        other args: see :class:`GazeHeatmap`.
    """

    def __init__(
        self,
        keys: KeysCollection = "fixations",
        image_key: str | Sequence[str] = "image",
        heatmap_key: str | Sequence[str] = "heatmap",
        sigma: float = KVASIR_SIGMA,
        canvas: Sequence[int] = DEFAULT_CANVAS,
        weight: str = "duration",
        mode: str = "fast",
        xy_transposed: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_keys = _per_key(self, "image_key", image_key)
        self.heatmap_keys = _per_key(self, "heatmap_key", heatmap_key, outputs=True)
        self.heatmap = GazeHeatmap(sigma, canvas, weight, mode, xy_transposed)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, image_key, heatmap_key in self.key_iterator(d, self.image_keys, self.heatmap_keys):
            image = d[image_key]
            _check_axes(image, image_key, self.heatmap.xy_transposed)
            axes = "xy" if self.heatmap.xy_transposed else "yx"
            d[heatmap_key] = _like(self.heatmap(d[key], _spatial_2d(image)), image, **{SPATIAL_AXES: axes})
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

    def __call__(self, heatmap, image) -> np.ndarray:
        """``heatmap`` (1, H, W), ``image`` channel-first (C, H, W) (RGB, or one channel for MR).

        When the heatmap records (x, y) spatial axes (``meta["spatial_axes"] == "xy"``, set by
        :class:`GazeHeatmapd`), the CRF runs on the image as displayed and the result is returned in
        the arrays' own order.
        """
        _spatial_2d(image)
        transposed = _axes(heatmap) == "xy"
        hm = _numpy(heatmap)
        if hm.ndim == 3:
            hm = hm[0]
        img = np.moveaxis(_numpy(image), 0, -1)
        if transposed:
            hm, img = hm.T, img.transpose(1, 0, 2)
        out = crf_refine(img, hm, **self.kwargs)
        return (out.T if transposed else out)[None]


class CRFRefined(MapTransform):
    """Dictionary wrapper of :class:`CRFRefine`.

    Args:
        keys: keys of heatmaps.
        image_key: key(s) of the channel-first image (one, or one per key).
        refined_key: key(s) to store the refined maps under (one per key).
        allow_missing_keys: don't raise when a heatmap key is absent.
        other args: see :class:`CRFRefine`.
    """

    def __init__(
        self,
        keys: KeysCollection = "heatmap",
        image_key: str | Sequence[str] = "image",
        refined_key: str | Sequence[str] = "refined",
        sxy: float = CRF_DEFAULTS["sxy"],
        srgb: float = CRF_DEFAULTS["srgb"],
        compat: float = CRF_DEFAULTS["compat"],
        iterations: int = CRF_DEFAULTS["iterations"],
        max_side: int | None = 160,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_keys = _per_key(self, "image_key", image_key)
        self.refined_keys = _per_key(self, "refined_key", refined_key, outputs=True)
        self.refine = CRFRefine(sxy, srgb, compat, iterations, max_side)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, image_key, refined_key in self.key_iterator(d, self.image_keys, self.refined_keys):
            d[refined_key] = _like(self.refine(d[key], d[image_key]), d[key])
        return d


class PseudoMaskLevels(Transform):
    """Refined map (1, H, W) -> N binary pseudo-masks (N, H, W), level i = map >= thresholds[i].

    With ``spatial_size`` the map is first resized (MONAI's ``Resize``, interpolation ``mode``) and
    thresholded after, as GazeSup's data loader does with its stored refined maps (bilinear, no
    anti-aliasing); without it the masks are made at the map's own size (and a later resize of the
    masks, with nearest-neighbour interpolation, picks pixels of them instead).

    Args:
        thresholds: one per level (Kvasir-SEG 0.5, 0.3; prostate 0.2, 0.4).
        spatial_size: resize the map to this (height, width) before thresholding; ``None`` = don't.
        mode: the resize's interpolation (``"bilinear"``, GazeSup's; any of MONAI's ``Resize`` modes).
    """

    def __init__(
        self,
        thresholds: Sequence[float] = KVASIR_THRESHOLDS,
        spatial_size: Sequence[int] | None = None,
        mode: str = "bilinear",
    ) -> None:
        self.thresholds = tuple(float(t) for t in thresholds)
        self.resize = None
        if spatial_size is not None:
            size = tuple(int(s) for s in spatial_size)
            if not size or min(size) < 1:
                raise InvalidInputError(f"spatial_size must be positive integers, got {spatial_size!r}")
            self.resize = Resize(size, mode=mode)

    def resized(self, prob):
        """``prob`` at ``spatial_size`` (itself without one); a MetaTensor records the resize."""
        if self.resize is None:
            return prob
        return self.resize(prob if isinstance(prob, torch.Tensor) else torch.as_tensor(_numpy(prob)))

    def __call__(self, prob) -> np.ndarray:
        return pseudo_mask_levels(_numpy(self.resized(prob)), self.thresholds).astype(np.float32)


class PseudoMaskLevelsd(MapTransform):
    """Dictionary wrapper of :class:`PseudoMaskLevels`.

    Args:
        keys: keys of refined maps.
        label_key: key(s) to store the (N, H, W) pseudo-masks under (one per key).
        thresholds: one per level.
        spatial_size: resize each map to this size before thresholding (GazeSup's order); ``None``
            thresholds at the map's own size.
        mode: interpolation of that resize.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "refined",
        label_key: str | Sequence[str] = "pseudo_label",
        thresholds: Sequence[float] = KVASIR_THRESHOLDS,
        spatial_size: Sequence[int] | None = None,
        mode: str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_keys = _per_key(self, "label_key", label_key, outputs=True)
        self.levels = PseudoMaskLevels(thresholds, spatial_size, mode)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, label_key in self.key_iterator(d, self.label_keys):
            prob = self.levels.resized(d[key])
            d[label_key] = _like(
                pseudo_mask_levels(_numpy(prob), self.levels.thresholds).astype(np.float32), prob
            )
        return d
