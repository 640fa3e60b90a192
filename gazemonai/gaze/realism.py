"""Measure how realistic simulated gaze is, against images that have both real gaze and masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError
from ..metrics import dice_score
from ..prep.io import read_ids, read_image, read_mask, resolve_in_folder
from .fixations import ImageFixations, read_fixation_csv
from .pseudo_masks import PRESETS, make_pseudo_masks
from .simulate import GazeSimulator

__all__ = ["fraction_inside", "gaze_realism"]


def fraction_inside(fx: ImageFixations, mask: np.ndarray) -> float:
    """Fraction of fixations whose pixel lies in ``mask`` (pixel = floor of the normalised position)."""
    h, w = mask.shape
    r = np.clip((fx.xy[:, 1] * h).astype(int), 0, h - 1)
    c = np.clip((fx.xy[:, 0] * w).astype(int), 0, w - 1)
    return float(mask[r, c].mean())


def gaze_realism(
    data_root: str | os.PathLike,
    gaze_csv: str | os.PathLike,
    split: str | None = "train.txt",
    limit: int | None = 200,
    seed: int = 0,
    preset: str = "kvasir",
    simulator: GazeSimulator | None = None,
) -> dict:
    """Real vs simulated gaze on the first ``limit`` ids of ``split``: fixations inside, pseudo-mask Dice."""
    root = Path(data_root)
    fixations = {fx.stem: fx for fx in read_fixation_csv(gaze_csv).values()}
    ids = read_ids(root / split) if split else sorted(fixations)
    ids = [i for i in ids if i in fixations][:limit]
    if not ids:
        raise InvalidInputError(f"no image of {split} has fixations in {gaze_csv}")
    sim = simulator or GazeSimulator(seed=seed)
    config = PRESETS[preset]
    out = {k: {"inside": [], "dice": {t: [] for t in config.thresholds}} for k in ("real", "sim")}
    for i in ids:
        real = fixations[i]
        img = read_image(resolve_in_folder(root / "images", real.image))
        gt = read_mask(resolve_in_folder(root / "masks", real.image), img.shape[:2])
        simulated = sim(gt, real.image)
        for kind, fx in (("real", real), ("sim", simulated)):
            out[kind]["inside"].append(fraction_inside(fx, gt))
            levels = make_pseudo_masks(img, fx.as_array(), config).levels
            for t, lvl in zip(config.thresholds, levels):
                out[kind]["dice"][t].append(dice_score(lvl, gt))
    res: dict = {"images": len(ids), "seed": seed}
    for kind in ("real", "sim"):
        res[kind] = {
            "inside": round(float(np.mean(out[kind]["inside"])), 4),
            "dice": {str(t): round(float(np.mean(v)), 4) for t, v in out[kind]["dice"].items()},
        }
    res["abs_diff"] = {
        "inside": round(abs(res["real"]["inside"] - res["sim"]["inside"]), 4),
        "dice": {
            t: round(abs(res["real"]["dice"][t] - res["sim"]["dice"][t]), 4) for t in res["real"]["dice"]
        },
    }
    return res
