"""Gaze -> pseudo-masks, one module per step of the data flow.

``fixations`` (CSV -> per-image fixations) -> ``heatmap`` -> ``refine`` (dense CRF with the image)
-> ``levels`` (thresholds -> N pseudo-masks); ``pseudo_masks`` chains them for one image and
``dataset`` over a dataset folder (the ``gazemonai pseudo-masks`` command). ``transforms`` is the
same chain as MONAI dictionary transforms. ``simulate`` draws fixations from masks for data sets
recorded without an eye tracker, ``realism`` measures how close they come to real gaze, and
``reference`` is the literal recipe, kept to validate and benchmark against.

Below this package: :mod:`gazemonai.prep` (file io) and :mod:`gazemonai.metrics`, never above it.
"""

from .fixations import FixationFormatError, ImageFixations, read_fixation_csv, write_fixation_csv
from .heatmap import gaze_heatmap
from .levels import LEVEL_THRESHOLDS, pseudo_mask_levels
from .pseudo_masks import PRESETS, PseudoMaskConfig, PseudoMasks, make_pseudo_masks
from .refine import crf_refine
from .simulate import GazeSimulator, simulate_fixations, simulate_gaze_folder

__all__ = [
    "FixationFormatError",
    "ImageFixations",
    "read_fixation_csv",
    "write_fixation_csv",
    "gaze_heatmap",
    "crf_refine",
    "pseudo_mask_levels",
    "LEVEL_THRESHOLDS",
    "PRESETS",
    "PseudoMaskConfig",
    "PseudoMasks",
    "make_pseudo_masks",
    "GazeSimulator",
    "simulate_fixations",
    "simulate_gaze_folder",
]
