"""How much the pseudo-masks at the network's input size depend on how they are made.

Three variants of the bundle's own ``gaze_transforms`` (``train.json``, at ``--image-size``):

* ``threshold_nearest``: the refined map (CRF at ``crf_max_side`` 160) thresholded at full size,
  the masks resized with nearest neighbour (the paper profile before 0.5, the CPU profile);
* ``bilinear_threshold``: the same map resized bilinearly, thresholded after (GazeSup's order,
  ``pseudo_mask_resize: bilinear``, the paper profile now);
* ``bilinear_threshold_fullres_crf``: as above with the CRF at full resolution (``crf_max_side``
  null), as GazeSup refines.

For each: the Dice of each level's pseudo-mask against the ground-truth mask (resized the same way,
nearest), and each variant's agreement (Dice) with ``bilinear_threshold_fullres_crf``. Means over the
first ``--limit`` training images. Prints one JSON line last.

Usage: python benchmarks/pseudo_mask_order.py --bundle bundles/kvasir_gaze \\
           --dataset-dir ../shared/data/kvasir-seg --gaze-csv ../shared/data/gazemedseg/kvasir_fixation.csv
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from gazemonai.train.datalists import split_datalist  # noqa: E402

VARIANTS = {
    "threshold_nearest": {"pseudo_mask_resize": "nearest", "crf_max_side": 160},
    "bilinear_threshold": {"pseudo_mask_resize": "bilinear", "crf_max_side": 160},
    "bilinear_threshold_fullres_crf": {"pseudo_mask_resize": "bilinear", "crf_max_side": None},
}
REFERENCE = "bilinear_threshold_fullres_crf"


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    total = int(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/kvasir_gaze")
    ap.add_argument("--dataset-dir", required=True)
    ap.add_argument("--gaze-csv", required=True)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=60)
    args = ap.parse_args(argv)
    items = split_datalist(args.dataset_dir, "train", args.gaze_csv, 0.1, 0, limit=args.limit)
    chains = {}
    for name, settings in VARIANTS.items():
        parser = ConfigParser()
        parser.read_config(str(Path(args.bundle) / "configs" / "train.json"))
        parser.update({"image_size": [args.image_size, args.image_size], **settings})
        chains[name] = parser.get_parsed_content("gaze_transforms")
    sums: dict = {}
    for item in items:
        masks = {}
        for name, chain in chains.items():
            d = dict(item)
            for t in chain:
                d = t(d)
            masks[name] = (d["pseudo_label"], d["label"][0])
        reference = masks[REFERENCE][0]
        for name, (pseudo, label) in masks.items():
            row = sums.setdefault(name, {"dice_vs_gt": [0.0] * len(pseudo), "agreement": [0.0] * len(pseudo)})
            for level in range(len(pseudo)):
                row["dice_vs_gt"][level] += _dice(pseudo[level], label)
                row["agreement"][level] += _dice(pseudo[level], reference[level])
    n = len(items)
    result = {
        "images": n,
        "image_size": args.image_size,
        **{
            name: {k: [round(v / n, 4) for v in values] for k, values in row.items()}
            for name, row in sums.items()
        },
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
