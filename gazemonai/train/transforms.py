"""MONAI transforms of the images and masks the bundles train on and predict.

Normalise image intensities by a named scheme (a model setting), binarise ground truth. Predictions
are written by MONAI's ``SaveImaged`` (``inference.json``'s ``save_mask``).

The gaze chain's own transforms (``GazeHeatmapd``, ``CRFRefined``, ``PseudoMaskLevelsd``) are in
:mod:`gazemonai.gaze.transforms`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, PILReader
from monai.transforms import MapTransform, NormalizeIntensity, SaveImaged, ScaleIntensityRange
from monai.utils import ensure_tuple, ensure_tuple_rep

from ..errors import ImageReadError, InvalidInputError

__all__ = [
    "NormalizeImaged",
    "IMAGE_NORMALIZATIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BinarizeMaskd",
    "CheckedPILReader",
    "ImageConverter",
    "SaveMaskd",
]

_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageConverter:
    """Each image read in full (a cut-short file named) and given one mode (see :class:`CheckedPILReader`).

    Kvasir-SEG is RGB JPEG, but a folder may hold one grayscale, RGBA, palette, CMYK or 16-bit image
    among them; MONAI's ``PILReader`` would hand each on in its own mode (1, 2, 3 or 4 channels)
    and the batch would fail to stack far from the file. Like ``gazemonai pseudo-masks``
    (:func:`gazemonai.prep.io.read_image`), every image becomes 8-bit: more than 8 bits per pixel
    min-max scaled to 0-255, an alpha channel dropped, then RGB for 3-channel networks (gray
    replicated) or L for 1-channel ones; other channel counts keep the file's mode.

    Args:
        channels: the network's ``in_channels``; ``None`` only reads in full (masks).
    """

    def __init__(self, channels: int | None = 3) -> None:
        self.channels = channels

    def __call__(self, image):
        from PIL import Image

        name = getattr(image, "filename", None) or "an image"
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:  # truncated, corrupt
            raise ImageReadError(f"cannot read image {name}: {e}") from None
        target = {1: "L", 3: "RGB"}.get(self.channels) if self.channels is not None else None
        if target is None:
            return image
        if image.mode in _HIGH_DEPTH:
            a = np.asarray(image, dtype=np.float64)
            lo, hi = (float(a.min()), float(a.max())) if np.isfinite(a).all() else (0.0, 0.0)
            a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
            image = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
        if image.mode != target:
            converted = image.convert(target)
            converted.format = image.format  # the metadata MONAI keeps stays that of the file
            image = converted
        return image


class CheckedPILReader(PILReader):
    """MONAI's ``PILReader``; every image read in full and brought to one mode by :class:`ImageConverter`.

    The check runs in ``get_data``, after ``LoadImage`` has chosen this reader: an error in ``read``
    would be swallowed while ``LoadImage`` tries its other readers, and the file's name lost.

    Args:
        channels: the network's ``in_channels`` (3: RGB, 1: L); ``None`` only reads in full (masks).
        kwargs: ``PILReader``'s (``reverse_indexing``, ...).
    """

    def __init__(self, channels: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.check = ImageConverter(channels)

    def get_data(self, img):
        images = [self.check(i) for i in ensure_tuple(img)]
        return super().get_data(images if len(images) > 1 else images[0])


#: ImageNet's per-channel mean and standard deviation of RGB intensities in [0, 1] (torchvision's)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the schemes :class:`NormalizeImaged` knows
IMAGE_NORMALIZATIONS = ("unit", "imagenet", "zscore")


class NormalizeImaged(MapTransform):
    """8-bit image intensities -> the network's input, by one named scheme.

    * ``"unit"``: ``x / 255`` clipped to [0, 1] (the bundles' CPU profile for RGB images);
    * ``"imagenet"``: ``(x / 255 - mean) / std`` per RGB channel with ImageNet's mean and std
      (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`), what GazeSup (Zhong et al., MICCAI 2024) feeds
      its network for Kvasir-SEG (torchvision's ``Normalize`` after dividing by 255); 3 channels only;
    * ``"zscore"``: ``(x - mean(x)) / std(x)`` over the whole image (MONAI's ``NormalizeIntensity``),
      what GazeSup feeds its network for the one-channel NCI-ISBI MR slices (the RGB copy of a slice
      is only the dense CRF's input).

    The scheme is a model setting: a network trained with one must be evaluated and served with it.

    Args:
        keys: image keys.
        mode: one of :data:`IMAGE_NORMALIZATIONS`.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(self, keys: KeysCollection = "image", mode: str = "unit", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if mode not in IMAGE_NORMALIZATIONS:
            raise InvalidInputError(
                f"image_normalization must be one of {IMAGE_NORMALIZATIONS}, got {mode!r}"
            )
        self.mode = mode
        if mode == "unit":
            self.transform = ScaleIntensityRange(0.0, 255.0, 0.0, 1.0, clip=True)
        elif mode == "imagenet":
            self.transform = NormalizeIntensity(
                subtrahend=[255.0 * m for m in IMAGENET_MEAN],
                divisor=[255.0 * s for s in IMAGENET_STD],
                channel_wise=True,
            )
        else:
            self.transform = NormalizeIntensity()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            channels = int(d[key].shape[0])
            if self.mode == "imagenet" and channels != len(IMAGENET_MEAN):
                raise InvalidInputError(
                    f"{key}: image_normalization 'imagenet' needs 3 (RGB) channels, got {channels} "
                    f"(one-channel images: 'zscore' or 'unit')"
                )
            d[key] = self.transform(d[key])
        return d


class BinarizeMaskd(MapTransform):
    """Channel-first mask -> (1, H, W) float 0/1: the maximum over channels above ``threshold``.

    JPEG masks such as Kvasir-SEG's are stored as noisy 0/255 RGB (threshold 127); masks whose
    values are all <= 1 are taken as 0/1 label maps (foreground > 0), as MONAI Label saves a
    ``final`` label. MONAI's ``AsDiscreted(threshold=...)`` does the comparison only: it keeps the
    channels and, with one threshold for both kinds, would empty a 0/1 mask or read JPEG noise as
    foreground.

    Args:
        keys: mask keys.
        threshold: foreground threshold for 0-255 masks (one, or one per key).
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        threshold: float | Sequence[float] = 127.0,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.thresholds = tuple(float(t) for t in ensure_tuple_rep(threshold, len(self.keys)))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key, threshold in self.key_iterator(d, self.thresholds):
            m = d[key]
            t = m if isinstance(m, torch.Tensor) else torch.as_tensor(np.asarray(m))
            if t.dim() < 3:
                raise InvalidInputError(f"{key}: expected a channel-first mask, got shape {tuple(t.shape)}")
            t = t.amax(dim=0, keepdim=True)
            thr = 0.0 if float(t.max()) <= 1.0 else threshold
            out = (t > thr).to(torch.float32)
            if isinstance(m, MetaTensor):
                out = MetaTensor(out.as_tensor() if isinstance(out, MetaTensor) else out, meta=dict(m.meta))
            d[key] = out
        return d


def SaveMaskd(keys: KeysCollection = "pred", output_dir: str = "./eval", source_key: str = "image"):
    """Deprecated (gazemonai 0.4.1 and before): MONAI's ``SaveImaged`` as ``inference.json``'s ``save_mask``.

    Kept so that a model registered before, whose stored ``inference.json`` names ``SaveMaskd``, still
    loads and writes the same ``OUTPUT_DIR/<stem>.png`` 0/255 masks. ``source_key`` is not used:
    ``SaveImaged`` names the file after the prediction's metadata (the image's, after ``Invertd``).
    """
    saver = SaveImaged(
        keys, output_dir=output_dir, output_postfix="", output_ext=".png", output_dtype=np.uint8, scale=255,
        resample=False, separate_folder=False, writer="PILWriter", print_log=False,
    )  # fmt: skip
    return saver.set_options(write_kwargs={"reverse_indexing": False})
