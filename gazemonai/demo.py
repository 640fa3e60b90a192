"""The README's demo: a synthetic dataset, simulated gaze, and pseudo-masks from it, end to end.

python -m gazemonai.demo --out demo_output
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .gaze.dataset import run_pseudo_masks
from .gaze.simulate import GazeSimulator, simulate_gaze_folder
from .synthetic import make_synthetic_dataset


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_output", help="folder for everything the demo writes")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = make_synthetic_dataset(out / "data", n_images=args.images, seed=args.seed)
    gaze_csv = out / "data" / "gaze.csv"
    sim = simulate_gaze_folder(data / "masks", gaze_csv, GazeSimulator(seed=args.seed))
    print(
        f"[1/2] synthetic dataset: {sim['images']} images in {data}; "
        f"simulated gaze: {sim['fixations']} fixations -> {gaze_csv}"
    )
    summary = run_pseudo_masks(data, gaze_csv, out / "pseudo_masks", progress=False)
    print(f"[2/2] pseudo-masks in {out / 'pseudo_masks'}: {summary['done'] + summary['resumed']} images")
    for name, v in summary["dice_vs_gt"].items():
        print(f"      {name} (threshold {v['threshold']}): mean Dice vs GT {v['mean_dice']:.3f}")
    print("outputs:")
    for sub in ("heatmap", "refined", "level_1", "level_2", "manifest.json"):
        print(f"  {out / 'pseudo_masks' / sub}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
