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

On a GPU (what ``gpu_check.py`` runs): ``--device cuda --dtype bfloat16 --ref gazesup --step joint``
compares ours (the bundles' GPU profile: joint step, fused SGD, autocast) with GazeSup's own loop
(``gazesup_step.py``) and adds ``peak_cuda_mb`` / ``ref_peak_cuda_mb`` (``torch.cuda.max_memory_allocated``);
``--profile-dir DIR`` profiles one more step of each (``torch.profiler``, top ops by self time).

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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gazesup_step


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
    device: str = "cpu",
    dtype: str = "float32",
    ref: str = "unfold",
    channels_last: bool = False,
    compile: bool = False,
    profile: str | None = None,
) -> dict:
    import torch
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from gazemonai.train.engine import AutocastInferer, MultiLevelPrepareBatch, train_iteration
    from gazemonai.train.losses import MultiLevelGazeLoss
    from gazemonai.train.networks import MultiLevelNet, feature_propagation_unfold

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # interpreter + torch + MONAI
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    gazesup = impl == "reference" and ref == "gazesup"
    # cuDNN's autotuner: on in the bundles (``cudnn_benchmark``), torch's default (off) in GazeSup's code
    torch.backends.cudnn.benchmark = cuda and not gazesup
    if impl == "ours":  # what the bundles refuse (torch.compile on CPU, with the low-memory step)
        from gazemonai.train.settings import check_acceleration

        check_acceleration(dev, dtype, False, compile, step, step_in_backward, release_memory)
    if gazesup:
        return measure_gazesup(levels, features, size, batch, steps, dev, dtype, profile, baseline)
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
    net = net.to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = (torch.rand(batch, levels, size, size, device=dev) > 0.5).float()
    if channels_last and not ref:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    # the trainer the bundles run: MONAI's SupervisedTrainer, one batch per iteration
    trainer = SupervisedTrainer(
        device=dev,
        max_epochs=1,
        train_data_loader=[{"image": x, "pseudo_label": y}] * (steps + 1),
        network=net,
        optimizer=opt,
        loss_function=MultiLevelGazeLoss(consistency="prop", consistency_weight=3.0),
        inferer=AutocastInferer(dtype),
        prepare_batch=MultiLevelPrepareBatch(output="train"),
        iteration_update=train_iteration("joint")
        if ref
        else train_iteration(step, step_in_backward, release_memory),
        optim_set_to_none=True,
        decollate=False,
        compile=compile and not ref,
    )
    marks = []

    def mark(engine):
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())

    trainer.add_event_handler(Events.ITERATION_COMPLETED, mark)
    trainer.run()  # the first iteration is the warm-up (allocations, oneDNN primitive creation)
    ms = (marks[-1] - marks[0]) / steps * 1000
    if profile:  # one more iteration of the same trainer (its own iteration function), profiled
        batchdata = {"image": x, "pseudo_label": y}
        _profile(lambda: trainer._process_function(trainer, batchdata), cuda, profile)
    return _result(ms, baseline, cuda)


def _result(ms: float, baseline: float, cuda: bool) -> dict:
    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = {"ms_per_step": round(ms, 1), "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1)}
    if cuda:  # the accelerator's peak: what the tensors held at most, and what the caching allocator reserved
        res["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        res["peak_cuda_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return res


def _profile(run_step, cuda: bool, path: str, rows: int = 30) -> None:
    """One more step under ``torch.profiler``: ops (kernels on CUDA) by self time, written to ``path``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:  # a profiler failure costs the table, never the timing measured before it
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, profile_memory=False) as prof:
            run_step()
            if cuda:
                torch.cuda.synchronize()
        table = None
        for key in ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",):
            try:
                table = prof.key_averages().table(sort_by=key, row_limit=rows)
                break
            except (AttributeError, KeyError):
                continue
        Path(path).write_text(table or prof.key_averages().table(row_limit=rows))
    except Exception as e:  # noqa: BLE001
        Path(path).write_text(f"profiling failed: {type(e).__name__}: {e}\n")


def measure_gazesup(levels, features, size, batch, steps, dev, dtype, profile, baseline) -> dict:
    """GazeSup's own loop (``gazesup_step.py``): plain PyTorch, unfolded feature propagation."""
    import gazesup_step
    import torch

    cuda = dev.type == "cuda"
    model, opt = gazesup_step.build(num_levels=levels, features=features)
    model.to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = (torch.rand(batch, levels, size, size, device=dev) > 0.5).float()
    amp = None if dtype in (None, "float32") else getattr(torch, dtype)
    marks = []
    for _ in range(steps + 1):  # the first is the warm-up
        gazesup_step.step(model, opt, x, y, amp)
        if cuda:
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
    ms = (marks[-1] - marks[0]) / steps * 1000
    if profile:
        _profile(lambda: gazesup_step.step(model, opt, x, y, amp), cuda, profile)
    return _result(ms, baseline, cuda)


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
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda: peak_cuda_mb, synchronised timing)")
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="autocast dtype of the forward pass (both implementations)",
    )
    ap.add_argument(
        "--ref",
        choices=["unfold", "gazesup"],
        default="unfold",
        help="the reference: our network with the unfold propagation in MONAI's joint iteration (unfold), "
        "or GazeSup's own loop reimplemented in gazesup_step.py (gazesup)",
    )
    ap.add_argument("--channels-last", action="store_true", help="ours: network and input in channels-last")
    ap.add_argument(
        "--compile", action="store_true", help="ours: SupervisedTrainer(compile=True) (joint step)"
    )
    ap.add_argument("--profile-dir", default=None, help="profile one more step of each; tables written here")
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
        device=args.device,
        dtype=args.dtype,
        ref=args.ref,
        channels_last=args.channels_last,
        compile=args.compile,
    )
    if args.impl != "both":
        if args.profile_dir:
            Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            opts["profile"] = str(Path(args.profile_dir) / f"profile_{args.impl}_{args.dtype}.txt")
        print(json.dumps(measure(args.impl, **opts)))
        return
    res = {}
    for impl in ("ours", "reference"):
        switches = ("step_in_backward", "fused", "release_memory")
        on_switches = ("channels_last", "compile")
        flags = {
            k: v
            for k, v in vars(args).items()
            if k not in ("impl", *switches, *on_switches) and v is not None
        }
        cmd = [sys.executable, __file__, "--impl", impl]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
        cmd += [f"--no-{k.replace('_', '-')}" for k in switches if not getattr(args, k)]
        cmd += [f"--{k.replace('_', '-')}" for k in on_switches if getattr(args, k)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{impl} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        out = proc.stdout.strip().splitlines()[-1]
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
        "device": args.device,
        "dtype": args.dtype,
        "ref": args.ref,
        "channels_last": args.channels_last,
        "compile": args.compile,
    }
    if "peak_cuda_mb" in res["ours"]:
        result["peak_cuda_mb"] = res["ours"]["peak_cuda_mb"]
        result["ref_peak_cuda_mb"] = res["reference"]["peak_cuda_mb"]
        result["cuda_ratio"] = round(res["ours"]["peak_cuda_mb"] / res["reference"]["peak_cuda_mb"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
