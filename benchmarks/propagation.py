"""The feature propagation alone, forward + backward: each implementation against the unfold reference.

Implementations (:mod:`gazemonai.train.propagation`): ``unfold`` (GazeSup's: the features unfolded
twice, einsum, then the 1x1 classifier), ``shifted`` (the CPU implementation), ``fused`` (the Triton
kernels; CUDA only), ``compiled`` (``torch.compile`` of the functional formulation). Each runs in its
own process on the same random features (B, C, H, W) and 1x1 classifier: with ``--values logits`` (what
``MultiLevelNet`` runs) the weights of the features average the classifier's one channel, with
``--values features`` the C features themselves. Timed: the mean of ``--steps`` forward + backward
passes after ``--warmup`` (compilation, autotuning); memory: the peak above what the inputs hold
(CUDA: ``torch.cuda.max_memory_allocated`` over the timed passes; CPU: the process's peak resident
memory, warm-up included, above what it was once the inputs existed). Each implementation's output
and gradients but ``shifted``'s are compared with ``shifted``'s (``max_abs_diff``) after the timing.
The last line is one JSON object::

    {"device": .., "shape": [B, C, H, W], "values": .., "dtype": .., "results": {impl: {"ms": ..,
     "peak_mb": .., "max_abs_diff": ..}}, "speedup": {impl: unfold ms / impl ms}, "memory_ratio": {...}}

Usage::

    python benchmarks/propagation.py                                   # CPU: 2 x 128 x 96 x 96
    python benchmarks/propagation.py --device cuda                     # 8 x 128 x 224 x 224, all four
    python benchmarks/propagation.py --device cuda --dtype bfloat16 --impls shifted,fused
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

IMPLS = ("unfold", "shifted", "fused", "compiled")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(impl: str, device: str, batch: int, channels: int, size: int, values: str, dtype: str, steps: int,
            warmup: int, threads: int, check: bool) -> dict:  # fmt: skip
    import torch

    from gazemonai.train.networks import feature_propagation, feature_propagation_unfold

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dt = getattr(torch, dtype)
    feat = torch.randn(batch, channels, size, size, device=dev, dtype=dt) / channels**0.5
    weight = torch.randn(1, channels, 1, 1, device=dev, dtype=dt) / channels**0.5
    grad_out = torch.randn(batch, 1 if values == "logits" else channels, size, size, device=dev, dtype=dt)

    def run(name, f):
        if name == "unfold":  # the reference's order: propagate the features, then classify
            prop = feature_propagation_unfold(f)
            return nn_conv(prop, weight) if values == "logits" else prop
        if values == "logits":
            return feature_propagation(f, values=nn_conv(f, weight), impl=name)
        return feature_propagation(f, impl=name)

    def nn_conv(x, w):
        return torch.nn.functional.conv2d(x, w)

    def step(name):
        f = feat.detach().requires_grad_()
        out = run(name, f)
        (grad,) = torch.autograd.grad(out, f, grad_out)
        return out.detach(), grad

    def sync():
        if cuda:
            torch.cuda.synchronize()

    base = _rss_mb()  # a process's peak resident memory only grows: the CPU's peak includes the warm-up
    for _ in range(warmup):
        step(impl)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(impl)
    sync()
    ms = (time.perf_counter() - t0) / steps * 1000
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else _rss_mb() - base
    res = {"ms": round(ms, 2), "peak_mb": round(peak, 1)}
    if check and impl != "shifted":
        out, grad = step(impl)
        ref_out, ref_grad = step("shifted")
        diff = max((out - ref_out).abs().max().item(), (grad - ref_grad).abs().max().item())
        res["max_abs_diff"] = float(f"{diff:.3g}")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument(
        "--impls", default=None, help=f"comma separated, of {IMPLS} (default: all that run there)"
    )
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on cuda, 2 on cpu")
    ap.add_argument("--channels", type=int, default=128)
    ap.add_argument("--size", type=int, default=None, help="default: 224 on cuda, 96 on cpu")
    ap.add_argument("--values", choices=["logits", "features"], default="logits")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--steps", type=int, default=None, help="default: 20 on cuda, 3 on cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-check", dest="check", action="store_false", help="skip the comparison with shifted")
    ap.add_argument("--impl", choices=IMPLS, default=None, help="(internal) measure one, print its JSON")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (8 if cuda else 2)
    args.size = args.size or (224 if cuda else 96)
    args.steps = args.steps or (20 if cuda else 3)
    opts = {k: getattr(args, k) for k in ("device", "batch", "channels", "size", "values", "dtype", "steps",
                                           "warmup", "threads", "check")}  # fmt: skip
    if args.impl:
        print(json.dumps(measure(args.impl, **opts)))
        return
    # fused runs on CUDA only (on a CPU only in Triton's interpreter, far too slow to time);
    # compiled on a CPU takes minutes to compile: ask for it with --impls
    impls = args.impls.split(",") if args.impls else [i for i in IMPLS if cuda or i in ("unfold", "shifted")]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        ap.error(f"--impls: unknown implementation(s) {', '.join(map(repr, unknown))} (one of {IMPLS})")
    results = {}
    for impl in impls:
        cmd = [sys.executable, __file__, "--impl", impl]
        cmd += [f"--{k}={v}" for k, v in opts.items() if k != "check"] + (
            [] if args.check else ["--no-check"]
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # recorded, not fatal: the others are still measured
            results[impl] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][-300:]}
            continue
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = {k: v for k, v in results.items() if "ms" in v}
    summary = {
        "device": args.device,
        "shape": [args.batch, args.channels, args.size, args.size],
        "values": args.values,
        "dtype": args.dtype,
        "steps": args.steps,
        "results": results,
    }
    if "unfold" in ok:
        ref = ok["unfold"]
        summary["speedup"] = {k: round(ref["ms"] / v["ms"], 2) for k, v in ok.items() if k != "unfold"}
        summary["memory_ratio"] = {
            k: round(v["peak_mb"] / ref["peak_mb"], 3)
            for k, v in ok.items()
            if k != "unfold" and ref["peak_mb"] > 0
        }
    if cuda:
        import torch

        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
