"""Gaze -> pseudo-masks, one module per step: fixations, heatmap, refine, levels (+ simulate)."""

from .fixations import FixationFormatError, ImageFixations, read_fixation_csv, write_fixation_csv
from .heatmap import gaze_heatmap
from .levels import LEVEL_THRESHOLDS, pseudo_mask_levels
from .pseudo_masks import PRESETS, PseudoMaskConfig, PseudoMasks, dice_score, make_pseudo_masks
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
    "dice_score",
    "GazeSimulator",
    "simulate_fixations",
    "simulate_gaze_folder",
]
