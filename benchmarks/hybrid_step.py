"""Cost of a hybrid-supervision training step against the plain gaze step (issue: <= 1.5x).

Both run through MONAI's ``SupervisedTrainer`` as the bundles configure them (``MultiLevelNet``, 2
levels, autocast, AdamW, MONAI's joint iteration), on random images and targets, in this process,
alternating so that both see the same machine state:

* ``gaze``: ``MultiLevelGazeLoss`` with the feature-propagated consistency (``train.json``);
* ``hybrid``: ``HybridLoss`` (DII weights, DCR) + ``DIIUpdate`` every iteration, the network
  returning its features and not propagating them (``hybrid.json``); 1 image of the batch strong.

The last line is one JSON object: ``{"gaze_ms_per_step", "hybrid_ms_per_step", "ratio", "dii_ms", ...}``
(``dii_ms``: the per-instance gradients and the weight update alone, timed inside the hybrid step).

Usage: python benchmarks/hybrid_step.py [--features 16,32,64,128,256,16 --size 64 --batch 8 --steps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    from monai.engines import SupervisedTrainer
    from monai.engines.utils import IterationEvents

    from gazemonai.train.engine import AutocastInferer, MultiLevelPrepareBatch
    from gazemonai.train.hybrid import DIIUpdate, DynamicInstanceIndicator, HybridLoss
    from gazemonai.train.losses import MultiLevelGazeLoss
    from gazemonai.train.networks import MultiLevelNet

    torch.manual_seed(0)
    hybrid = kind == "hybrid"
    net = MultiLevelNet(
        num_levels=2, features=features, in_channels=3, return_features=hybrid, propagate=not hybrid
    )
    batchdata = {
        "image": torch.rand(batch, 3, size, size),
        "pseudo_label": (torch.rand(batch, 2, size, size) > 0.5).float(),
        "strong": torch.tensor([1] + [0] * (batch - 1)),
        "index": torch.arange(batch),
    }
    loss = (
        HybridLoss(DynamicInstanceIndicator(batch), ramp_iterations=100) if hybrid else MultiLevelGazeLoss()
    )
    engine = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batchdata],
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 2e-3),
        loss_function=loss,
        inferer=AutocastInferer(dtype),
        prepare_batch=MultiLevelPrepareBatch(
            "pseudo_label", output="train", extra_keys=("strong", "index") if hybrid else ()
        ),
        decollate=False,
    )
    timed = None
    if hybrid:
        timed = TimedDIIUpdate(DIIUpdate(loss))
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, timed)
    engine.state.iteration = 1

    def step():
        engine._iteration(engine, batchdata)  # MONAI's joint iteration, its events fired

    return step, timed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default="16,32,64,128,256,16")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    features = [int(f) for f in args.features.split(",")]
    steps = {k: trainer(k, features, args.size, args.batch, args.dtype) for k in ("gaze", "hybrid")}
    for step, _ in steps.values():  # warm-up
        step()
        step()
    steps["hybrid"][1].seconds = 0.0
    times = {k: [] for k in steps}
    for _ in range(args.steps):  # alternating: both see the same machine state
        for kind, (step, _) in steps.items():
            t0 = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - t0)
    results = {f"{k}_ms_per_step": round(1000 * sorted(v)[len(v) // 2], 1) for k, v in times.items()}
    results["ratio"] = round(results["hybrid_ms_per_step"] / results["gaze_ms_per_step"], 3)
    results["dii_ms"] = round(1000 * steps["hybrid"][1].seconds / args.steps, 2)
    results.update(
        features=features, size=args.size, batch=args.batch, threads=args.threads, dtype=args.dtype
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
