"""Opt-in ways to train the multi-level network in less memory, and what each one can't do.

None of this is on by default. The bundles' ``configs/low_memory.json`` turns all three on (add it
after ``train.json``, and after ``paper_profile.json`` for the paper's widths on a CPU):

* :class:`LevelwiseTrainStep` (``train_step: levelwise``) trains the levels one after another: one
  level's activations alive at a time instead of N, for N - 1 extra forward passes without autograd.
  Any device; measured on CPU. Refuses ``DistributedDataParallel``, ``amp`` (GradScaler),
  ``accumulation_steps > 1`` and ``compile``.
* :class:`StepInBackward` (``step_in_backward: true``, with the levelwise step) updates each
  parameter and frees its gradient as soon as the gradient is ready: no moment holds every gradient.
  Any device. Also refuses handlers on ``BACKWARD_COMPLETED`` (gradient clipping, gradient logging)
  and optimizers not known to treat parameters independently.
* :func:`release_freed_memory` (``release_memory: true``, with the levelwise step) hands the heap
  pages glibc keeps after the decoder's backward back to the OS, at each level network's
  ``bottleneck``, before the bottleneck's large weight gradients arrive. Linux with glibc, CPU
  tensors only; does nothing elsewhere.

Measured together (``benchmarks/train_step.py``, paper widths, 2 levels, 96², batch 2, 2 CPU
threads, ``benchmarks/README.md``): 0.45-0.46 of the reference's peak resident memory; the release
alone -75 MB, without measurable time. The levelwise step gives the joint step's update (tested to
1e-5); the step in backward gives ``optimizer.step()``'s update for per-parameter optimizers.

Why each refusal: the levelwise step runs its own backward passes, one per level, so AMP's scaler,
MONAI's gradient accumulation and a compiled network (``forward_level`` would bypass the compiled
forward) are not honoured, and DDP would reduce all gradients in every pass. With the step in
backward, gradients are gone before ``BACKWARD_COMPLETED`` fires, so a handler that clips or reads
them would silently see none, and a second backward before ``optimizer.step()`` (accumulation)
would apply twice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache, partial

import torch
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from ..errors import InvalidInputError
from .losses import detached_terms

__all__ = ["LevelwiseTrainStep", "StepInBackward", "release_freed_memory", "PER_PARAMETER_OPTIMIZERS"]

#: ``torch.optim`` optimizers whose step treats each parameter on its own (stepping one parameter at a
#: time gives the same update).
PER_PARAMETER_OPTIMIZERS = (
    "SGD",
    "Adam",
    "AdamW",
    "Adamax",
    "Adagrad",
    "Adadelta",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "ASGD",
    "Adafactor",
)


def _check_per_parameter(optimizer: torch.optim.Optimizer) -> None:
    cls = type(optimizer)
    if cls.__module__.startswith("torch.optim") and cls.__name__ in PER_PARAMETER_OPTIMIZERS:
        return
    raise InvalidInputError(
        f"step_in_backward steps the optimizer one parameter at a time, which gives its usual update only "
        f"for optimizers that treat parameters independently ({', '.join(PER_PARAMETER_OPTIMIZERS)} of "
        f"torch.optim); {cls.__module__}.{cls.__name__} is not one of them: set step_in_backward false"
    )


class StepInBackward:
    """Apply ``optimizer`` to each parameter as soon as its gradient is ready, then free the gradient.

    The gradients of all parameters never exist at once, which saves their memory (a quarter of the
    training state for SGD with momentum: parameters, gradients, momentum, activations). It is the
    same update as ``optimizer.step()`` after ``backward()`` for per-parameter optimizers
    (:data:`PER_PARAMETER_OPTIMIZERS`; others are refused). The engine's own ``zero_grad()``/``step()``
    calls find no gradients and do nothing; LR schedulers, ``state_dict`` and checkpoints keep
    working on the wrapped ``optimizer``, which :meth:`attach` returns.

    Not possible with it, because no gradient outlives its own update: gradient clipping or anything
    else that reads gradients after ``backward()``, gradient accumulation (every backward pass
    updates), AMP's ``GradScaler`` (it unscales and skips steps after the backward pass).
    :class:`LevelwiseTrainStep` refuses these combinations in a MONAI trainer; attached by hand to a
    plain training loop, only the optimizer is checked here, the rest is the loop's to avoid.

    Args:
        optimizer: a per-parameter ``torch.optim`` optimizer over leaf parameters.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        _check_per_parameter(optimizer)
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
    the former. CPU memory only (CUDA memory is torch's caching allocator's). Returns False (and does
    nothing) where the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _release_on_gradient(grad: torch.Tensor) -> None:
    release_freed_memory()  # returns None: the gradient passes unchanged


def _release_after_gradient(module, args, output) -> None:
    """Forward hook: when the gradient of ``module``'s output is ready in backward, release memory.

    That moment is just before ``module``'s own backward (for the bottleneck: before its large
    weight gradients are allocated). A tensor hook is the only place autograd offers for it.
    """
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
        output.register_hook(_release_on_gradient)


def _handlers(engine, event) -> list:
    # ignite keeps an engine's handlers per event in ``_event_handlers``; it has no public count
    return list(getattr(engine, "_event_handlers", {}).get(event, []))


class LevelwiseTrainStep:
    """A ``SupervisedTrainer`` iteration that trains the N level networks one after another.

    The consistency loss compares each level with its peers' *stop-gradient* predictions, so the
    total loss splits into per-level shares (:meth:`~gazemonai.train.losses.MultiLevelGazeLoss.level_loss`)
    whose gradients never cross levels. This step first runs levels 1..N-1 without gradients (their
    predictions, as peers), then for level N down to 1: forward with gradients, its share, backward.
    The gradients are those of the joint step, but only one level's activations are alive at a
    time (1/N of them), for N-1 extra forward passes without autograd. With ``step_in_backward``
    (:class:`StepInBackward`), each level's parameters are updated during its own backward pass,
    after every prediction that uses them was made.

    Ignite's events fire when each stage of the iteration is complete for all levels:
    ``FORWARD_COMPLETED`` once every level's logits exist (before level 1's loss), ``LOSS_COMPLETED``
    once the total loss exists (before level 1's backward), ``BACKWARD_COMPLETED`` after the last
    backward pass (before ``optimizer.step()``) and ``MODEL_COMPLETED`` after it. Levels N..2 have
    already run their backward pass when the first two fire, so a handler cannot change the loss
    before backward (which is why AMP's scaler is refused).

    Use as ``SupervisedTrainer(iteration_update=LevelwiseTrainStep(), ...)`` with a
    :class:`~gazemonai.train.networks.MultiLevelNet` and a
    :class:`~gazemonai.train.losses.MultiLevelGazeLoss`; the engine's ``prepare_batch``, ``inferer``
    (e.g. :class:`~gazemonai.train.engine.AutocastInferer`) and optimizer are used as the default
    iteration would. The output holds ``pred`` (``{"logits": mean, "level_logits": [...]}``,
    detached) and ``loss`` (the total); ``engine.state.loss_terms`` holds each level's detached Dice,
    BCE and consistency (keys as :meth:`~gazemonai.train.losses.MultiLevelGazeLoss.terms`) for
    :class:`~gazemonai.train.handlers.LossTerms`.

    Args:
        step_in_backward: attach :class:`StepInBackward` to the engine's optimizer on the first
            iteration (each parameter updated as soon as its gradient is ready; the same update).
        release_memory: call :func:`release_freed_memory` in each level's backward pass when it
            reaches the level network's ``bottleneck`` (glibc; the paper's widths: -75 MB).

    Raises:
        InvalidInputError: on the first iteration, for an engine it cannot honour (see the module).
    """

    def __init__(self, step_in_backward: bool = False, release_memory: bool = False) -> None:
        self.step_in_backward = bool(step_in_backward)
        self.release_memory = bool(release_memory)
        self._hooked: set[int] = set()

    def check(self, engine) -> None:
        """Refuse an engine whose settings this step cannot honour (called on every iteration)."""
        if isinstance(engine.network, torch.nn.parallel.DistributedDataParallel):
            raise InvalidInputError(
                "the levelwise step cannot train a DistributedDataParallel network (each backward "
                "reaches one level only); use train_step 'joint' for multi-GPU training"
            )
        if not hasattr(engine.loss_function, "level_terms"):
            raise InvalidInputError(
                f"the levelwise step needs a loss that splits into level shares (MultiLevelGazeLoss), "
                f"not {type(engine.loss_function).__name__} (hybrid supervision: use train_step 'joint')"
            )
        if getattr(engine, "amp", False):
            raise InvalidInputError(
                "the levelwise step does not run AMP (GradScaler): set amp false and use an autocast "
                "inferer (compute_dtype), or train_step 'joint'"
            )
        if getattr(engine, "accumulation_steps", 1) > 1:
            raise InvalidInputError(
                f"the levelwise step updates every iteration; accumulation_steps="
                f"{engine.accumulation_steps} needs train_step 'joint'"
            )
        if getattr(engine, "compile", False):
            raise InvalidInputError(
                "the levelwise step calls each level network directly, bypassing torch.compile: set "
                "compile false or use train_step 'joint'"
            )
        if self.step_in_backward:
            _check_per_parameter(engine.optimizer)
            prompt = getattr(engine.network, "prompt", None)
            if isinstance(prompt, torch.nn.Module) and any(p.requires_grad for p in prompt.parameters()):
                raise InvalidInputError(
                    "step_in_backward would step the prompt network, which every level shares, once per "
                    "level with that level's gradient only (not the joint step): set freeze_prompt true "
                    "or step_in_backward false"
                )
            readers = _handlers(engine, IterationEvents.BACKWARD_COMPLETED)
            if readers:
                raise InvalidInputError(
                    f"step_in_backward frees each gradient as soon as it is applied, so the "
                    f"{len(readers)} handler(s) on BACKWARD_COMPLETED (e.g. gradient clipping) would see "
                    f"none: set step_in_backward false"
                )

    def _hook_release_points(self, network) -> None:
        for level in network.levels:
            module = getattr(level, "bottleneck", None)
            if not isinstance(module, torch.nn.Module):
                raise InvalidInputError(
                    f"release_memory needs level networks with a 'bottleneck' module; "
                    f"{type(level).__name__} has none"
                )
            if id(module) not in self._hooked:
                module.register_forward_hook(_release_after_gradient)
                self._hooked.add(id(module))

    def __call__(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        self.check(engine)
        if self.step_in_backward:
            StepInBackward.attach(engine.optimizer)
        if self.release_memory:
            self._hook_release_points(engine.network)
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
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
        loss_terms: dict[str, torch.Tensor] = {}
        for i in reversed(range(n)):
            logits, prop = engine.inferer(inputs, partial(network.forward_level, level=i))
            if i == 0:  # every level's logits exist: the iteration's forward pass is complete
                peers[0] = logits.detach()
                # as the network's output="train" dict (the propagated logits are not kept)
                engine.state.output[CommonKeys.PRED] = {
                    "logits": torch.stack(peers).mean(0),
                    "level_logits": peers,
                }
                engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = loss_fn.level_terms(i, logits, prop, [peers[j] for j in range(n) if j != i], targets)
            loss = loss_fn.combine(terms)
            loss_terms.update({f"{name}_{i + 1}": v for name, v in detached_terms(terms).items()})
            total = total + loss.detach()
            if i == 0:  # the total is known: the iteration's loss is complete
                engine.state.output[CommonKeys.LOSS] = total
                engine.state.loss_terms = _with_sums(loss_terms, total)
                engine.fire_event(IterationEvents.LOSS_COMPLETED)
            loss.backward()
            peers[i] = logits.detach()
            del logits, prop, loss, terms
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _with_sums(terms: dict[str, torch.Tensor], total: torch.Tensor) -> dict[str, torch.Tensor]:
    """``terms`` ordered by level with ``consistency`` (the levels' sum) and ``total``, as ``terms()``."""
    out = dict(sorted(terms.items(), key=lambda kv: (int(kv[0].rsplit("_", 1)[1]), kv[0])))
    cons = [v for k, v in out.items() if k.startswith("consistency_")]
    if cons:
        out["consistency"] = torch.stack(cons).sum()
    out["total"] = detached_terms({"total": total})["total"]
    return out
