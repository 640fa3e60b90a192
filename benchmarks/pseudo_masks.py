"""Our pseudo-mask pipeline against the literal GazeSup recipe, on the same images, in one run.

Reference = :mod:`gazemonai.gaze.reference`: 768x768 float32 canvas, ``scipy.ndimage.gaussian_filter``,
OpenCV bicubic resize, dense CRF at full resolution. Ours = the package defaults (separable heatmap
evaluated at the image's pixels, CRF at 160 px on the longer side). Both are timed per image from the
decoded image and fixations to the pseudo-masks, sequentially in this one process (2 threads), and
scored against the ground-truth masks. The last line printed is one JSON object::

    {"images": N, "s_per_image": .., "ref_s_per_image": .., "speedup": ..,
     "dice": {"0.3": .., ...}, "ref_dice": {...}, "heatmap_max_abs_diff": ..}

Usage: python benchmarks/pseudo_masks.py --data-root ../shared/data/kvasir-seg \
           --gaze-csv ../shared/data/gazemedseg/kvasir_fixation.csv --limit 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gazemonai.gaze.fixations import read_fixation_csv  # noqa: E402
from gazemonai.gaze.levels import pseudo_mask_levels  # noqa: E402
from gazemonai.gaze.pseudo_masks import PRESETS, make_pseudo_masks  # noqa: E402
from gazemonai.gaze.reference import reference_pseudo_masks  # noqa: E402
from gazemonai.metrics import dice_score  # noqa: E402
from gazemonai.prep.io import (  # noqa: E402
    read_ids,  # noqa: E402
    read_image,
    read_mask,
    resolve_in_folder,
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--gaze-csv", required=True)
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument(
        "--split", default="train.txt", help="split file under data root; images without GT are skipped"
    )
    ap.add_argument("--preset", default="kvasir", choices=sorted(PRESETS))
    ap.add_argument("--thresholds", default="0.3,0.4,0.5", help="thresholds to score (comma separated)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    root = Path(args.data_root)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    config = PRESETS[args.preset].replace(thresholds=tuple(thresholds))
    fixations = {fx.stem: fx for fx in read_fixation_csv(args.gaze_csv).values()}
    ids = read_ids(root / args.split) if (root / args.split).is_file() else sorted(fixations)
    ids = [i for i in ids if i in fixations][: args.limit]
    ours_t = ref_t = 0.0
    dice = {t: [] for t in thresholds}
    ref_dice = {t: [] for t in thresholds}
    heat_diff = 0.0
    make_pseudo_masks(np.zeros((64, 64, 3), np.uint8), np.array([[0.5, 0.5, 100.0]]), config)  # warm-up
    for i in ids:
        fx = fixations[i]
        img = read_image(resolve_in_folder(root / "images", fx.image))
        gt = read_mask(resolve_in_folder(root / "masks", fx.image), img.shape[:2])
        f = fx.as_array()
        t0 = time.perf_counter()
        ours = make_pseudo_masks(img, f, config)
        t1 = time.perf_counter()
        ref_heat, ref_refined, _ = reference_pseudo_masks(img, f, sigma=config.sigma, thresholds=thresholds)
        ref_levels = pseudo_mask_levels(ref_refined, thresholds)
        t2 = time.perf_counter()
        ours_t += t1 - t0
        ref_t += t2 - t1
        heat_diff = max(heat_diff, float(np.abs(ours.heatmap - ref_heat).max()))
        for k, t in enumerate(thresholds):
            dice[t].append(dice_score(ours.levels[k], gt))
            ref_dice[t].append(dice_score(ref_levels[k], gt))
    n = len(ids)
    result = {
        "images": n,
        "s_per_image": round(ours_t / n, 4),
        "ref_s_per_image": round(ref_t / n, 4),
        "speedup": round(ref_t / ours_t, 2),
        "dice": {str(t): round(float(np.mean(v)), 4) for t, v in dice.items()},
        "ref_dice": {str(t): round(float(np.mean(v)), 4) for t, v in ref_dice.items()},
        "heatmap_max_abs_diff": round(heat_diff, 5),
        "crf_max_side": config.max_side,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
