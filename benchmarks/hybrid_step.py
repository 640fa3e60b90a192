"""Cost of a hybrid-supervision training step against the plain gaze step (issue: <= 1.5x).

Both run through MONAI's ``SupervisedTrainer`` as the bundles configure them (``MultiLevelNet``, 2
levels, autocast, AdamW, MONAI's joint iteration), on random images and targets, in this process,
alternating so that both see the same machine state:

* ``gaze``: ``MultiLevelGazeLoss`` with the feature-propagated consistency (``train.json``);
* ``hybrid``: ``HybridLoss`` (DII weights, DCR as GazeSup's propagated consistency on the weak
  images) + ``DIIUpdate`` every iteration, the network also returning its features (``hybrid.json``);
  1 image of the batch strong.

The last line is one JSON object: ``{"gaze_ms_per_step", "hybrid_ms_per_step", "ratio", "dii_ms", ...}``
(``dii_ms``: the per-instance gradients and the weight update alone, timed inside the hybrid step).

Usage: python benchmarks/hybrid_step.py [--features 16,32,64,128,256,16 --size 64 --batch 8 --steps 10]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_timing import alternate, joint_step, step_parser  # noqa: E402


class TimedDIIUpdate:
    """``DIIUpdate`` whose time is added up (the per-instance gradients and the weight step)."""

    def __init__(self, update):
        self.update, self.seconds = update, 0.0

    def __call__(self, engine):
        t0 = time.perf_counter()
        self.update(engine)
        self.seconds += time.perf_counter() - t0


def trainer(kind: str, features, size: int, batch: int, dtype: str):
    import torch
    from monai.engines.utils import IterationEvents

    from gazemonai.train.engine import MultiLevelPrepareBatch
    from gazemonai.train.hybrid import DIIUpdate, DynamicInstanceIndicator, HybridLoss
    from gazemonai.train.losses import MultiLevelGazeLoss
    from gazemonai.train.networks import MultiLevelNet

    torch.manual_seed(0)
    hybrid = kind == "hybrid"
    net = MultiLevelNet(num_levels=2, features=features, in_channels=3, return_features=hybrid)
    batchdata = {
        "image": torch.rand(batch, 3, size, size),
        "pseudo_label": (torch.rand(batch, 2, size, size) > 0.5).float(),
        "strong": torch.tensor([1] + [0] * (batch - 1)),
        "index": torch.arange(batch),
    }
    loss = HybridLoss(DynamicInstanceIndicator(batch), dcr_loss="prop") if hybrid else MultiLevelGazeLoss()
    prepare = MultiLevelPrepareBatch(
        "pseudo_label", output="train", extra_keys=("strong", "index") if hybrid else ()
    )
    step, engine = joint_step(net, loss, prepare, batchdata, dtype)
    timed = None
    if hybrid:
        timed = TimedDIIUpdate(DIIUpdate(loss))
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, timed)
    return step, timed


def main(argv=None):
    args = step_parser(__doc__).parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    features = [int(f) for f in args.features.split(",")]
    steps = {k: trainer(k, features, args.size, args.batch, args.dtype) for k in ("gaze", "hybrid")}
    timed = steps["hybrid"][1]

    def reset():
        timed.seconds = 0.0

    medians = alternate({k: step for k, (step, _) in steps.items()}, args.steps, after_warmup=reset)
    results = {f"{k}_ms_per_step": v for k, v in medians.items()}
    results["ratio"] = round(medians["hybrid"] / medians["gaze"], 3)
    results["dii_ms"] = round(1000 * timed.seconds / args.steps, 2)
    results.update(
        features=features, size=args.size, batch=args.batch, threads=args.threads, dtype=args.dtype
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
