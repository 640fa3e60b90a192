"""Engine pieces the bundles' MONAI trainers and evaluators use.

* :class:`MultiLevelPrepareBatch` hands the trainer/evaluator the image, the level targets and the
  network output mode (``output="train"`` for the loss, ``"stack"`` for per-level evaluation).
* :func:`num_levels` / :func:`level_label_key`: one ``supervision`` switch (``gaze`` or ``full``).
* :class:`StepInBackward`: optimizer step fused into the backward pass (saves the gradient memory).
* :class:`LevelwiseTrainStep`: a trainer iteration that trains the level networks one after
  another (the same gradients as the joint step, one level's activations in memory at a time).
* :func:`release_freed_memory`: hand the C allocator's free pages back to the OS (used by the
  levelwise step at a chosen point of the backward pass).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Sequence
from functools import lru_cache, partial

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
    "release_freed_memory",
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
        """Install the hooks on ``optimizer``'s parameters and return ``optimizer`` (for configs).

        Attaching an optimizer a second time does nothing (one step per gradient, not two).
        """
        if getattr(optimizer, "_gazemonai_step_in_backward", None) is None:
            optimizer._gazemonai_step_in_backward = cls(optimizer)
        return optimizer


@lru_cache(maxsize=1)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return None


def release_freed_memory() -> bool:
    """Return the pages of memory freed so far to the operating system (glibc ``malloc_trim``).

    glibc keeps freed tensor memory of up to 32 MB per block in the process's heap for reuse, and
    larger blocks are always fresh pages. In a backward pass through a U-Net, the decoder's freed
    activations therefore stay resident while the bottleneck's large weight gradients arrive as new
    pages, and the two add up in the peak resident memory. Calling this between the two releases
    the former. Returns False (and does nothing) where the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _release_on_gradient(grad: torch.Tensor) -> None:
    release_freed_memory()  # returns None: the gradient passes unchanged


def _release_after_gradient(module, args, output) -> None:
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(_release_on_gradient)


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
        release_memory_at: submodules of each level network (e.g. ``"backbone.down_4"``, the
            U-Net's bottleneck) at which the backward pass calls :func:`release_freed_memory`: when
            the gradient of that module's output is ready, before the module's own backward.
    """

    def __init__(self, step_in_backward: bool = False, release_memory_at: Sequence[str] = ()) -> None:
        self.step_in_backward = step_in_backward
        self.release_memory_at = tuple(release_memory_at)
        self._hooked = set()

    def _hook_release_points(self, network) -> None:
        for level in network.levels:
            for name in self.release_memory_at:
                try:
                    module = level.get_submodule(name)
                except AttributeError as e:
                    raise ValueError(f"release_memory_at: the level network has no submodule {name!r}") from e
                if id(module) not in self._hooked:
                    module.register_forward_hook(_release_after_gradient)
                    self._hooked.add(id(module))

    def __call__(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        if isinstance(engine.network, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(
                "the levelwise step cannot train a DistributedDataParallel network (each backward "
                "reaches one level only); use train_step 'joint' for multi-GPU training"
            )
        if self.step_in_backward:
            StepInBackward.attach(engine.optimizer)
        self._hook_release_points(engine.network)
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


def train_iteration(
    step: str = "levelwise", step_in_backward: bool = False, release_memory_at: Sequence[str] = ()
):
    """The trainer's ``iteration_update`` for a training-step mode (what bundle configs call).

    Args:
        step: ``"levelwise"`` (:class:`LevelwiseTrainStep`) or ``"joint"`` (MONAI's default
            iteration: all levels forward, one loss, one backward).
        step_in_backward: levelwise only: the optimizer steps inside the backward pass
            (:class:`StepInBackward`), which saves the memory of all gradients at once.
        release_memory_at: levelwise only: see :class:`LevelwiseTrainStep`.
    """
    if step == "joint":
        if step_in_backward or release_memory_at:
            raise ValueError(
                "step_in_backward and release_memory_at need train_step 'levelwise' (MONAI's joint "
                "iteration is used as it is)"
            )
        return None
    if step == "levelwise":
        return LevelwiseTrainStep(step_in_backward=step_in_backward, release_memory_at=release_memory_at)
    raise ValueError(f"step must be 'levelwise' or 'joint', got {step!r}")
