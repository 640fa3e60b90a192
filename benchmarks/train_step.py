"""One training step of the multi-level gaze loss: ours against the reference's unfold propagation.

Each implementation runs in its own process (so peak RSS is its own), fp32, 2 threads, SGD step
included, through MONAI's ``SupervisedTrainer``. Ours runs as ``paper_profile.json`` +
``low_memory.json`` configure the bundles: the levelwise step (``--step levelwise``: same gradients,
one level's activations at a time), torch's fused SGD stepping inside the backward pass, the freed
memory released when the backward pass reaches each level's bottleneck (``--no-release-memory`` to
turn off), and the propagation of the classifier's logits without unfolding
(:mod:`gazemonai.train.low_memory`). The reference is GazeSup's formulation: copied levels,
features unfolded and propagated, then classified, torch's default SGD, MONAI's joint iteration.
``--impl both`` (default) runs ours then the reference at the same settings and prints,
as the last line, one JSON object::

    {"ms_per_step": .., "peak_rss_mb": .., "ref_ms_per_step": .., "ref_peak_rss_mb": .., "speedup": ..,
     "rss_ratio": .., "step_mb": .., "ref_step_mb": .., "step_ratio": .., "levels": N, ...}

``peak_rss_mb`` is the process's peak resident memory; ``step_mb`` the same minus the resident memory
after importing torch and MONAI (~545 MB here, the same in both processes).

Usage: python benchmarks/train_step.py --levels 2 --features 64,128,256,512,1024,128 --size 96 --batch 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(
    impl: str,
    levels,
    features,
    size,
    batch,
    steps,
    threads,
    step_in_backward: bool,
    step: str,
    propagation: str,
    fused: bool,
    release_memory: bool,
) -> dict:
    import torch
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from gazemonai.train.engine import MultiLevelPrepareBatch, train_iteration
    from gazemonai.train.losses import MultiLevelGazeLoss
    from gazemonai.train.networks import MultiLevelNet, feature_propagation_unfold

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # interpreter + torch + MONAI
    ref = impl == "reference"
    # the reference: copied levels, features propagated by unfolding, then classified (GazeSup's code)
    net = MultiLevelNet(
        num_levels=levels,
        features=features,
        init="copy" if ref else "independent",
        propagate_logits=not ref,
        propagation="shifted" if ref else propagation,  # the reference's is replaced below
    )
    if ref:
        net.propagation = feature_propagation_unfold
    # the reference's optimizer is the GazeSup code's (torch's default, per-parameter loop or foreach);
    # ours is the bundle's paper profile: the same SGD with torch's fused CPU kernel
    fused = impl == "ours" and fused
    opt = torch.optim.SGD(
        net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=4e-4, fused=fused or None
    )
    x = torch.randn(batch, 3, size, size)
    y = (torch.rand(batch, levels, size, size) > 0.5).float()
    # the trainer the bundles run: MONAI's SupervisedTrainer, one batch per iteration
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[{"image": x, "pseudo_label": y}] * (steps + 1),
        network=net,
        optimizer=opt,
        loss_function=MultiLevelGazeLoss(consistency="prop", consistency_weight=3.0),
        prepare_batch=MultiLevelPrepareBatch(output="train"),
        iteration_update=train_iteration("joint")
        if ref
        else train_iteration(step, step_in_backward, release_memory),
        optim_set_to_none=True,
        decollate=False,
    )
    marks = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: marks.append(time.perf_counter()))
    trainer.run()  # the first iteration is the warm-up (allocations, oneDNN primitive creation)
    ms = (marks[-1] - marks[0]) / steps * 1000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms_per_step": round(ms, 1), "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--features", default="64,128,256,512,1024,128", help="BasicUNet widths, comma separated")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--impl", choices=["ours", "reference", "both"], default="both")
    ap.add_argument(
        "--propagation",
        choices=["auto", "shifted", "fused", "compiled"],
        default="auto",
        help="ours: the propagation's implementation (gazemonai.train.propagation; auto: fused Triton "
        "kernel on CUDA, shifted on a CPU)",
    )
    ap.add_argument(
        "--step",
        choices=["levelwise", "joint"],
        default="levelwise",
        help="ours: train the levels one after another (default) or all at once, as the reference",
    )
    ap.add_argument(
        "--no-step-in-backward",
        dest="step_in_backward",
        action="store_false",
        help="ours, levelwise: optimizer.step() after backward instead of inside the backward pass",
    )
    ap.add_argument(
        "--no-fused", dest="fused", action="store_false", help="ours: torch's default SGD (not fused)"
    )
    ap.add_argument(
        "--no-release-memory",
        dest="release_memory",
        action="store_false",
        help="ours, levelwise: do not release freed memory when backward reaches each level's bottleneck",
    )
    args = ap.parse_args(argv)
    if args.step == "joint":  # MONAI's joint iteration as it is
        args.step_in_backward, args.release_memory = False, False
    features = [int(f) for f in args.features.split(",")]
    opts = dict(
        levels=args.levels,
        features=features,
        size=args.size,
        batch=args.batch,
        steps=args.steps,
        threads=args.threads,
        step_in_backward=args.step_in_backward,
        step=args.step,
        propagation=args.propagation,
        fused=args.fused,
        release_memory=args.release_memory,
    )
    if args.impl != "both":
        print(json.dumps(measure(args.impl, **opts)))
        return
    res = {}
    for impl in ("ours", "reference"):
        switches = ("step_in_backward", "fused", "release_memory")
        flags = {k: v for k, v in vars(args).items() if k not in ("impl", *switches)}
        cmd = [sys.executable, __file__, "--impl", impl]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
        cmd += [f"--no-{k.replace('_', '-')}" for k in switches if not getattr(args, k)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res[impl] = json.loads(out)
    result = {
        "ms_per_step": res["ours"]["ms_per_step"],
        "peak_rss_mb": res["ours"]["peak_rss_mb"],
        "ref_ms_per_step": res["reference"]["ms_per_step"],
        "ref_peak_rss_mb": res["reference"]["peak_rss_mb"],
        "speedup": round(res["reference"]["ms_per_step"] / res["ours"]["ms_per_step"], 2),
        "rss_ratio": round(res["ours"]["peak_rss_mb"] / res["reference"]["peak_rss_mb"], 3),
        # the same without the libraries' resident memory (identical in both processes)
        "step_mb": round(res["ours"]["peak_rss_mb"] - res["ours"]["baseline_rss_mb"], 1),
        "ref_step_mb": round(res["reference"]["peak_rss_mb"] - res["reference"]["baseline_rss_mb"], 1),
        "step_ratio": round(
            (res["ours"]["peak_rss_mb"] - res["ours"]["baseline_rss_mb"])
            / (res["reference"]["peak_rss_mb"] - res["reference"]["baseline_rss_mb"]),
            3,
        ),
        "levels": args.levels,
        "features": features,
        "size": args.size,
        "batch": args.batch,
        "propagation": args.propagation,
        "step_in_backward": args.step_in_backward,
        "fused": args.fused,
        "release_memory": args.release_memory,
        "step": args.step,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
