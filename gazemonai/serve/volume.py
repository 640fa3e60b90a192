"""An MR volume in, a mask volume out with the volume's geometry: the 2-D prostate model, slice by slice.

The ``prostate_gaze`` bundle segments 2-D axial slices, the images gaze was recorded on.
:func:`segment_volume` takes what a clinician has, a volume (NIfTI, NRRD, MHA, ... or a DICOM series
folder, read with ITK), and returns what a viewer or a planning system takes, a mask volume on the
same grid:

1. the volume is read in full and checked (:func:`gazemonai.prep.slices.read_volume_image`);
2. its intensities become the 8-bit slices ``gazemonai prepare-slices`` writes for training (the
   volume clipped to its 0.5-99.5 percentiles, scaled to 0-255), slice ``k`` being the ``k``-th along
   the third index axis as ITK orders it;
3. each slice goes through the bundle's own inference pieces (``inference.json``: resize, z-score,
   network, back to the slice's size, threshold) -- the masks inference writes for those PNG slices;
4. the 0/1 slices are stacked and written with the input's spacing, origin and direction
   (``.nii.gz`` by default; any format ITK writes).

DICOM-SEG output (for PACS) is not written here; ``highdicom`` is the maintained library for it.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import InvalidInputError
from ..prep.outputs import VOLUME_SUFFIXES, check_output
from ..prep.slices import read_volume_image, scale_to_uint8

__all__ = ["segment_volume"]

logger = logging.getLogger(__name__)


def segment_volume(volume: str | os.PathLike, out: str | os.PathLike, model) -> dict:
    """Segment ``volume`` slice by slice with ``model`` and write the mask volume to ``out``.

    Args:
        volume: a volume file or a DICOM series folder.
        out: the mask file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``); 0 background, 1 gland, ``uint8``.
        model: a single-channel :class:`~gazemonai.serve.registry.BundlePyfuncModel` (e.g. from
            :func:`~gazemonai.serve.registry.bundle_predictor`).

    Returns:
        ``{"mask": out, "shape": (slices, rows, columns), "slices_with_mask": n, "voxels": n}``.
    """
    import itk

    if getattr(model, "in_channels", 1) != 1:
        raise InvalidInputError(
            f"segmenting volumes needs a single-channel model; this one takes {model.in_channels} channels"
        )
    out = check_output("out", out, inputs={"volume": volume}, suffixes=VOLUME_SUFFIXES)  # before any work
    image, array = read_volume_image(volume)
    pixels = scale_to_uint8(array)
    masks = np.stack([model.predict_image(pixels[k]) for k in range(pixels.shape[0])]).astype(np.uint8)
    if masks.shape != array.shape:  # the bundle's inference restores each slice's size
        raise RuntimeError(f"mask shape {masks.shape} differs from the volume's {array.shape}")
    result = itk.image_from_array(np.ascontiguousarray(masks))
    result.SetSpacing(image.GetSpacing())
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp-" + out.name)
    itk.imwrite(result, str(tmp), compression=True)
    os.replace(tmp, out)
    summary = {
        "mask": str(out),
        "shape": list(masks.shape),
        "slices_with_mask": int(masks.reshape(masks.shape[0], -1).any(axis=1).sum()),
        "voxels": int(masks.sum()),
    }
    logger.info("%s -> %s: %s", volume, out, summary)
    return summary
