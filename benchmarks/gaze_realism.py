"""How close simulated gaze is to real gaze, on images that have both a mask and real fixations.

For each image: the fraction of fixations that land inside the ground-truth mask, and the Dice of
the pseudo-masks (our default pipeline) against the mask, once with the real fixations and once with
fixations simulated from the mask. Prints one JSON line last:

    {"images": N, "real": {"inside": .., "dice": {thr: ..}}, "sim": {...}, "abs_diff": {...}}

Usage: python benchmarks/gaze_realism.py --data-root ../shared/data/kvasir-seg \
           --gaze-csv ../shared/data/gazemedseg/kvasir_fixation.csv --split train.txt --limit 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gazemonai.gaze.realism import gaze_realism  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--gaze-csv", required=True)
    ap.add_argument("--split", default="train.txt", help="split file under data root (ids)")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="kvasir")
    args = ap.parse_args(argv)
    result = gaze_realism(args.data_root, args.gaze_csv, args.split, args.limit, args.seed, args.preset)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
