"""Engine pieces the bundles' MONAI trainers and evaluators use.

* :func:`num_levels` / :func:`level_label_key`: one ``supervision`` switch (``gaze``, ``full``, or
  ``hybrid``: a few full masks and gaze for the rest, :mod:`gazemonai.train.hybrid`).
* :class:`MultiLevelPrepareBatch` hands the trainer/evaluator the image, the level targets and the
  network output mode (``output="train"`` for the loss, ``"stack"`` for per-level evaluation).
* :class:`AutocastInferer`: the network under ``torch.autocast`` on any device (bf16 on CPUs too).
* :func:`train_iteration`: the trainer's iteration for a ``train_step`` setting: MONAI's own
  (``"joint"``, the default) or the opt-in levelwise step of :mod:`gazemonai.train.low_memory`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.engines import PrepareBatch
from monai.inferers import SimpleInferer
from monai.utils import CommonKeys

from ..errors import InvalidInputError
from .low_memory import LevelwiseTrainStep

__all__ = [
    "MultiLevelPrepareBatch",
    "AutocastInferer",
    "train_iteration",
    "num_levels",
    "level_label_key",
    "SUPERVISION_MODES",
    "set_determinism",
]

SUPERVISION_MODES = ("gaze", "full", "hybrid")


def _check_mode(supervision: str) -> str:
    if supervision not in SUPERVISION_MODES:
        raise InvalidInputError(f"supervision must be one of {SUPERVISION_MODES}, got {supervision!r}")
    return supervision


def num_levels(supervision: str, thresholds: Sequence[float]) -> int:
    """Level networks for a supervision mode: one per threshold with gaze and hybrid, one with full masks."""
    return 1 if _check_mode(supervision) == "full" else len(thresholds)


def level_label_key(supervision: str, pseudo_key: str = "pseudo_label", label_key: str = "label") -> str:
    """The key the training loss reads: the stacked level targets (gaze, hybrid), the mask (full)."""
    return label_key if _check_mode(supervision) == "full" else pseudo_key


class MultiLevelPrepareBatch(PrepareBatch):
    """Batch preparation for :class:`~gazemonai.train.networks.MultiLevelNet` in a MONAI engine.

    Returns ``(image, target, (), {"output": output})`` so the engine's inferer calls
    ``network(image, output=output)``. With ``extra_keys`` the target is a dict,
    ``{"target": target, key: batch[key], ...}`` (hybrid supervision: ``("strong", "index")``).

    Args:
        label_key: the target key: ``"pseudo_label"`` (B, N, H, W) for gaze, ``"label"`` for full
            masks and for evaluation against ground truth.
        image_key: the image key.
        output: network output mode (``"train"`` for the loss, ``"stack"`` for per-level metrics,
            ``"ensemble"`` for plain prediction).
        extra_keys: further batch keys the loss reads beside the target.
    """

    def __init__(
        self,
        label_key: str = "pseudo_label",
        image_key: str = CommonKeys.IMAGE,
        output: str = "train",
        extra_keys: Sequence[str] = (),
    ):
        self.label_key = label_key
        self.image_key = image_key
        self.output = output
        self.extra_keys = tuple(extra_keys)

    def __call__(
        self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs
    ):
        if self.label_key not in batchdata:
            raise KeyError(f"batch has no {self.label_key!r} (keys: {', '.join(map(str, batchdata))})")
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        target = batchdata[self.label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        if self.extra_keys:
            missing = [k for k in self.extra_keys if k not in batchdata]
            if missing:
                raise KeyError(f"batch has no {missing} (keys: {', '.join(map(str, batchdata))})")
            extra = {k: torch.as_tensor(batchdata[k]).to(device=device) for k in self.extra_keys}
            target = {"target": target, **extra}
        return image, target, (), {"output": self.output}


def set_determinism(seed: int | None, cudnn_benchmark: bool = True) -> None:
    """MONAI's ``set_determinism(seed)``, with cuDNN's autotuner left on unless asked otherwise.

    MONAI seeds every random stream and, for CUDA, picks deterministic cuDNN algorithms with the
    autotuner off (``cudnn.benchmark = False``), which keeps GPU users off the fastest convolution
    algorithms. Here the streams are seeded the same way; with ``cudnn_benchmark`` (the bundles'
    default) cuDNN picks its fastest algorithms, so a GPU run may differ from another in the last
    bits (CPU runs are unaffected: they stay identical run to run). ``False`` is MONAI's behaviour.

    Args:
        seed: the seed (``None``: MONAI's, no seeding).
        cudnn_benchmark: let cuDNN autotune (``torch.backends.cudnn.benchmark``).
    """
    from monai.utils import set_determinism as monai_set_determinism

    monai_set_determinism(seed=seed)
    if cudnn_benchmark:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


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


def train_iteration(step: str = "joint", step_in_backward: bool = False, release_memory: bool = False):
    """The trainer's ``iteration_update`` for a training-step mode (what bundle configs call).

    Args:
        step: ``"joint"`` (MONAI's default iteration: all levels forward, one loss, one backward;
            returns ``None``) or ``"levelwise"``
            (:class:`~gazemonai.train.low_memory.LevelwiseTrainStep`: the same update, one level's
            activations in memory at a time).
        step_in_backward: levelwise only: the optimizer steps inside the backward pass, which saves
            the memory of all gradients at once (see :mod:`gazemonai.train.low_memory`).
        release_memory: levelwise only: return freed heap memory to the OS at each level's
            bottleneck during backward (glibc).

    Raises:
        InvalidInputError: an unknown step, or a memory option without the levelwise step.
    """
    if step == "joint":
        if step_in_backward or release_memory:
            raise InvalidInputError(
                "step_in_backward and release_memory need train_step 'levelwise' (MONAI's joint "
                "iteration is used as it is)"
            )
        return None
    if step == "levelwise":
        return LevelwiseTrainStep(step_in_backward=step_in_backward, release_memory=release_memory)
    raise InvalidInputError(f"train_step must be 'levelwise' or 'joint', got {step!r}")
