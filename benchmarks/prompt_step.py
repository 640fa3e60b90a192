"""Cost of an image-label-prompted training step against the plain one (stage 2 of the prompt).

Three steps through MONAI's ``SupervisedTrainer`` as ``train.json`` configures them (2 levels,
``MultiLevelGazeLoss`` with the propagated consistency, autocast, AdamW, joint iteration), on random
images and pseudo-masks, in this process, alternating so that all see the same machine state:

* ``plain``: ``MultiLevelNet`` (``train.json``);
* ``prompted``: ``MultiLevelNet(prompt_features=features)`` with the stage-1 network frozen
  (``prompt_stage2.json``): one extra encoder pass without gradients, 9 fusion convolutions per level;
* ``fine_tuned``: the same with ``freeze_prompt=False``.

The last line is one JSON object: ``{"plain_ms_per_step", "prompted_ms_per_step",
"fine_tuned_ms_per_step", "prompted_ratio", "fine_tuned_ratio", "parameters": {...}, ...}``.

Usage: python benchmarks/prompt_step.py [--features 16,32,64,128,256,16 --size 64 --batch 8 --steps 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("plain", "prompted", "fine_tuned")


def trainer(kind: str, features, size: int, batch: int, dtype: str):
    import torch
    from monai.engines import SupervisedTrainer

    from gazemonai.train.engine import AutocastInferer, MultiLevelPrepareBatch
    from gazemonai.train.losses import MultiLevelGazeLoss
    from gazemonai.train.networks import MultiLevelNet

    torch.manual_seed(0)
    prompt = {} if kind == "plain" else {"prompt_features": features, "freeze_prompt": kind == "prompted"}
    net = MultiLevelNet(num_levels=2, features=features, in_channels=3, **prompt)
    batchdata = {
        "image": torch.rand(batch, 3, size, size),
        "pseudo_label": (torch.rand(batch, 2, size, size) > 0.5).float(),
    }
    engine = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batchdata],
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 2e-3),
        loss_function=MultiLevelGazeLoss(),
        inferer=AutocastInferer(dtype),
        prepare_batch=MultiLevelPrepareBatch("pseudo_label", output="train"),
        decollate=False,
    )
    engine.state.iteration = 1

    def step():
        engine._iteration(engine, batchdata)  # MONAI's joint iteration, its events fired

    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return step, {"total": sum(p.numel() for p in net.parameters()), "trained": trainable}


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
    steps = {k: trainer(k, features, args.size, args.batch, args.dtype) for k in KINDS}
    for step, _ in steps.values():  # warm-up
        step()
        step()
    times = {k: [] for k in steps}
    for _ in range(args.steps):
        for kind, (step, _) in steps.items():
            t0 = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - t0)
    results = {f"{k}_ms_per_step": round(1000 * sorted(v)[len(v) // 2], 1) for k, v in times.items()}
    for kind in KINDS[1:]:
        results[f"{kind}_ratio"] = round(results[f"{kind}_ms_per_step"] / results["plain_ms_per_step"], 3)
    results["parameters"] = {k: v for k, (_, v) in steps.items()}
    results.update(
        features=features, size=args.size, batch=args.batch, threads=args.threads, dtype=args.dtype
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
