"""Engine pieces the bundles' MONAI trainers and evaluators use.

* :class:`MultiLevelPrepareBatch` hands the trainer/evaluator the image, the level targets and the
  network output mode (``output="train"`` for the loss, ``"stack"`` for per-level evaluation).
* :func:`num_levels` / :func:`level_label_key`: one ``supervision`` switch (``gaze`` or ``full``).
* :class:`StepInBackward`: optimizer step fused into the backward pass (saves the gradient memory).
* :class:`LevelwiseTrainStep`: a trainer iteration that trains the level networks one after
  another (the same gradients as the joint step, one level's activations in memory at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from monai.engines import PrepareBatch
from monai.engines.utils import IterationEvents
from monai.inferers import SimpleInferer
from monai.utils import CommonKeys

__all__ = [
    "MultiLevelPrepareBatch",
    "AutocastInferer",
    "StepInBackward",
    "LevelwiseTrainStep",
    "train_iteration",
    "num_levels",
    "level_label_key",
    "SUPERVISION_MODES",
]

SUPERVISION_MODES = ("gaze", "full")


def _check_mode(supervision: str) -> str:
    if supervision not in SUPERVISION_MODES:
        raise ValueError(f"supervision must be one of {SUPERVISION_MODES}, got {supervision!r}")
    return supervision


def num_levels(supervision: str, thresholds: Sequence[float]) -> int:
    """Level networks for a supervision mode: one per threshold with gaze, one with full masks."""
    return len(thresholds) if _check_mode(supervision) == "gaze" else 1


def level_label_key(supervision: str, pseudo_key: str = "pseudo_label", label_key: str = "label") -> str:
    """The data key the training loss reads: the stacked pseudo-masks with gaze, the mask with full."""
    return pseudo_key if _check_mode(supervision) == "gaze" else label_key


class MultiLevelPrepareBatch(PrepareBatch):
    """Batch preparation for :class:`~gazemonai.networks.MultiLevelNet` in a MONAI engine.

    Returns ``(image, target, (), {"output": output})`` so the engine's inferer calls
    ``network(image, output=output)``.

    Args:
        label_key: the target key: ``"pseudo_label"`` (B, N, H, W) for gaze, ``"label"`` for full
            masks and for evaluation against ground truth.
        image_key: the image key.
        output: network output mode (``"train"`` for the loss, ``"stack"`` for per-level metrics,
            ``"ensemble"`` for plain prediction).
    """

    def __init__(
        self, label_key: str = "pseudo_label", image_key: str = CommonKeys.IMAGE, output: str = "train"
    ):
        self.label_key = label_key
        self.image_key = image_key
        self.output = output

    def __call__(
        self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
    ):
        if self.label_key not in batchdata:
            raise KeyError(f"batch has no {self.label_key!r} (keys: {', '.join(map(str, batchdata))})")
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        target = batchdata[self.label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return image, target, (), {"output": self.output}


def _to_float(x):
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_float(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_float(v) for v in x)
    return x


class AutocastInferer(SimpleInferer):
    """``SimpleInferer`` under ``torch.autocast`` on the input's device, outputs returned as float32.

    MONAI's engines autocast on CUDA only (``amp=True``); this also runs bfloat16 on CPUs with
    native bf16 instructions (AVX512-BF16, AMX), where it measured 1.4-2x faster per training step.

    Args:
        dtype: ``"bfloat16"``, ``"float16"``, or ``None``/``"float32"`` for no autocast.
    """

    def __init__(self, dtype: str | None = "bfloat16") -> None:
        super().__init__()
        self.dtype = None if dtype in (None, "float32", "none") else getattr(torch, dtype)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if self.dtype is None:
            return network(inputs, *args, **kwargs)
        with torch.autocast(device_type=inputs.device.type, dtype=self.dtype):
            out = network(inputs, *args, **kwargs)
        return _to_float(out)


class StepInBackward:
    """Apply ``optimizer`` to each parameter as soon as its gradient is ready, then free the gradient.

    The gradients of all parameters never exist at once, which saves their memory (a quarter of the
    training state for SGD with momentum: parameters, gradients, momentum, activations). It is the
    same update as ``optimizer.step()`` after ``backward()`` for optimizers that treat parameters
    independently (SGD, Adam, AdamW); it rules out gradient clipping, accumulation and AMP scaling.
    The engine's own ``zero_grad()``/``step()`` calls find no gradients and do nothing, and LR
    schedulers, ``state_dict`` and checkpoints keep working on the wrapped ``optimizer``, which this
    returns from :meth:`attach`.

    Args:
        optimizer: a ``torch.optim`` optimizer over leaf parameters.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.handles = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(self._step))

    def _step(self, param: torch.Tensor) -> None:
        self.optimizer.step()  # only ``param`` holds a gradient now
        param.grad = None

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Install the hooks on ``optimizer``'s parameters and return ``optimizer`` (for configs)."""
        optimizer._gazemonai_step_in_backward = cls(optimizer)
        return optimizer


class LevelwiseTrainStep:
    """A ``SupervisedTrainer`` iteration that trains the N level networks one after another.

    The consistency loss compares each level with its peers' *stop-gradient* predictions, so the
    total loss splits into per-level shares (:meth:`~gazemonai.losses.MultiLevelGazeLoss.level_loss`)
    whose gradients never cross levels. This step first runs levels 1..N-1 without gradients (their
    predictions, as peers), then for level N down to 1: forward with gradients, its share, backward.
    The gradients are those of the joint step, but only one level's activations are alive at a
    time (1/N of them), for N-1 extra forward passes without autograd. With
    :class:`StepInBackward`, each level's parameters are updated during its own backward pass,
    after every prediction that uses them was made.

    Use as ``SupervisedTrainer(iteration_update=LevelwiseTrainStep(), ...)`` with a
    :class:`~gazemonai.networks.MultiLevelNet` and a :class:`~gazemonai.losses.MultiLevelGazeLoss`;
    the engine's ``prepare_batch``, ``inferer`` (e.g. :class:`AutocastInferer`) and optimizer are used
    as the default iteration would. The output holds ``pred`` (``{"logits": mean, "level_logits":
    [...]}``, detached) and ``loss`` (the total) like the default iteration's.

    Not for ``DistributedDataParallel``: each backward pass reaches one level's parameters only, while
    DDP reduces all of them in every pass (use the joint step there; ``multi_gpu_train.json`` does).

    Args:
        step_in_backward: attach :class:`StepInBackward` to the engine's optimizer on the first
            iteration (each parameter updated as soon as its gradient is ready; the same update).
    """

    def __init__(self, step_in_backward: bool = False) -> None:
        self.step_in_backward = step_in_backward

    def __call__(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        if isinstance(engine.network, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(
                "the levelwise step cannot train a DistributedDataParallel network (each backward "
                "reaches one level only); use train_step 'joint' for multi-GPU training"
            )
        if self.step_in_backward and not hasattr(engine.optimizer, "_gazemonai_step_in_backward"):
            StepInBackward.attach(engine.optimizer)
        inputs, targets, _, _ = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        engine.state.output = {CommonKeys.IMAGE: inputs, CommonKeys.LABEL: targets}
        network, loss_fn = engine.network, engine.loss_function
        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        n = network.num_levels
        with torch.no_grad():
            peers = [
                engine.inferer(inputs, partial(network.forward_level, level=j, propagate=False))[0]
                for j in range(n - 1)
            ]
        peers.append(None)
        total = inputs.new_zeros((), dtype=torch.float32)
        for i in reversed(range(n)):
            logits, prop = engine.inferer(inputs, partial(network.forward_level, level=i))
            loss = loss_fn.level_loss(i, logits, prop, [peers[j] for j in range(n) if j != i], targets)
            loss.backward()
            peers[i] = logits.detach()
            total = total + loss.detach()
            del logits, prop, loss
        # as the network's output="train" dict (the propagated logits are not kept)
        engine.state.output[CommonKeys.PRED] = {"logits": torch.stack(peers).mean(0), "level_logits": peers}
        engine.state.output[CommonKeys.LOSS] = total
        for event in (
            IterationEvents.FORWARD_COMPLETED,
            IterationEvents.LOSS_COMPLETED,
            IterationEvents.BACKWARD_COMPLETED,
        ):
            engine.fire_event(event)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def train_iteration(step: str = "levelwise", step_in_backward: bool = False):
    """The trainer's ``iteration_update`` for a training-step mode (what bundle configs call).

    Args:
        step: ``"levelwise"`` (:class:`LevelwiseTrainStep`) or ``"joint"`` (MONAI's default
            iteration: all levels forward, one loss, one backward).
        step_in_backward: levelwise only: the optimizer steps inside the backward pass
            (:class:`StepInBackward`), which saves the memory of all gradients at once.
    """
    if step == "joint":
        if step_in_backward:
            raise ValueError(
                "step_in_backward needs train_step 'levelwise' (MONAI's joint iteration steps after backward)"
            )
        return None
    if step == "levelwise":
        return LevelwiseTrainStep(step_in_backward=step_in_backward)
    raise ValueError(f"step must be 'levelwise' or 'joint', got {step!r}")
