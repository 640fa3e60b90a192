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
                                        [--prompt-arch unet|encoder]

``--prompt-arch``: the stage-1 network's form (``prompt_stage1_arch``; the bundles' default ``unet``
adds its decoder's forward pass, and with fine-tuning its backward pass).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_timing import alternate, joint_step, step_parser  # noqa: E402

KINDS = ("plain", "prompted", "fine_tuned")


def trainer(kind: str, features, size: int, batch: int, dtype: str, arch: str = "unet"):
    import torch

    from gazemonai.train.engine import MultiLevelPrepareBatch
    from gazemonai.train.losses import MultiLevelGazeLoss
    from gazemonai.train.networks import MultiLevelNet

    torch.manual_seed(0)
    prompt = (
        {}
        if kind == "plain"
        else {"prompt_features": features, "freeze_prompt": kind == "prompted", "prompt_arch": arch}
    )
    net = MultiLevelNet(num_levels=2, features=features, in_channels=3, **prompt)
    batchdata = {
        "image": torch.rand(batch, 3, size, size),
        "pseudo_label": (torch.rand(batch, 2, size, size) > 0.5).float(),
    }
    prepare = MultiLevelPrepareBatch("pseudo_label", output="train")
    step, _ = joint_step(net, MultiLevelGazeLoss(), prepare, batchdata, dtype)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    return step, {"total": sum(p.numel() for p in net.parameters()), "trained": trainable}


def main(argv=None):
    parser = step_parser(__doc__)
    parser.add_argument("--prompt-arch", default="unet", choices=("unet", "encoder"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    features = [int(f) for f in args.features.split(",")]
    steps = {k: trainer(k, features, args.size, args.batch, args.dtype, args.prompt_arch) for k in KINDS}
    medians = alternate({k: step for k, (step, _) in steps.items()}, args.steps)
    results = {f"{k}_ms_per_step": v for k, v in medians.items()}
    for kind in KINDS[1:]:
        results[f"{kind}_ratio"] = round(medians[kind] / medians["plain"], 3)
    results["parameters"] = {k: v for k, (_, v) in steps.items()}
    results.update(
        features=features,
        size=args.size,
        batch=args.batch,
        threads=args.threads,
        dtype=args.dtype,
        prompt_arch=args.prompt_arch,
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
