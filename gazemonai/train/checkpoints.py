"""Training state that survives a restart: the latest state, the best model, the random streams.

A bundle run writes two files under ``<bundle_root>/models``:

* ``latest.pt`` (:class:`LatestCheckpoint`), after every epoch: the network, optimizer and LR
  schedule, the trainer's epoch and iteration, the best model's score (:class:`BestCheckpoint`) and
  every random stream (:class:`RandomStates`). Restarting the same command resumes from it, and a
  run killed at any moment (even ``kill -9`` mid-epoch) and resumed ends with the same weights and
  metrics, to the bit on a CPU, as one never interrupted: the interrupted epoch is replayed from
  the same random state.
* ``model.pt`` (:class:`BestCheckpoint`), whenever the validation key metric improves: the network's
  bare state dict, as MONAI's ``CheckpointSaver`` writes a single object, so the model zoo's
  ``python -m monai.bundle ckpt_export network_def --ckpt_file models/model.pt ...`` loads it as is.
  Its score is part of ``latest.pt``, so a resumed run keeps the best model instead of overwriting it
  with the first validation after the restart. (bundles before 0.5.0 wrote ``{"model": state_dict}``;
  :func:`model_weights` reads both.)

Both hold only state dicts, tensors and plain numbers, and are read with ``torch.load(...,
weights_only=True)``: a checkpoint handed to you cannot run code. Under ``torch.distributed`` every
rank loads ``latest.pt`` and rank 0 alone writes it, without DDP's ``module.`` prefix, so a
single-process run can resume a multi-process one and the other way round.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import random
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import CosineAnnealingLR

from ..errors import CheckpointMismatchError, CheckpointReadError, InvalidInputError
from ..prep.io import exclusive_folder

__all__ = [
    "LatestCheckpoint", "BestCheckpoint", "LoadWeights", "RandomStates", "check_checkpoint_file",
    "load_weights",
    "model_weights", "unwrap",
]  # fmt: skip

#: what torch's ``weights_only`` unpickler raises on bytes that are no pickle at all (a text file
#: gave ``KeyError: 101``, the memo lookup of the byte ``e``), besides ``UnpicklingError``
_GARBAGE = (pickle.UnpicklingError, EOFError, KeyError, IndexError, ValueError, TypeError, AttributeError)

logger = logging.getLogger(__name__)


def unwrap(obj):
    """The module inside ``DistributedDataParallel``/``DataParallel`` (or ``obj`` itself)."""
    return (
        obj.module
        if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))
        else obj
    )


def load_weights(path: str | os.PathLike, map_location="cpu"):
    """A checkpoint's contents, read with ``weights_only=True`` (no code in the file can run).

    Raises:
        CheckpointReadError: the file is not a torch checkpoint of plain weights and numbers (a
            corrupt or truncated file, or one that would need code to load); the cause is kept.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except _GARBAGE as e:  # not a pickle, cut short, or more than weights
        raise CheckpointReadError(
            f"cannot read checkpoint {path} as weights: {type(e).__name__} {e} (not a torch checkpoint?)"
        ) from e
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):  # e.g. out of memory: not the file's fault
            raise
        raise CheckpointReadError(f"cannot read checkpoint {path} as weights: {e}") from e


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """Refuse a file that cannot be a torch checkpoint, by its first bytes, before it is copied or staged.

    ``torch.save`` writes a zip archive (or, in the legacy format, a pickle starting with protocol
    byte ``0x80``); anything else -- a text file, an image, a truncated archive -- is refused here,
    naming the user's file rather than the staged copy a later read would name.

    Raises:
        CheckpointReadError: naming ``path``.
    """
    import zipfile

    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):
        kind = "empty" if not head else "a text file" if head.decode("latin-1").isprintable() else "not one"
        raise CheckpointReadError(
            f"checkpoint {path} is not a torch checkpoint ({kind}; torch.save writes a zip archive)"
        )
    return path


def model_weights(state, key: str = "model"):
    """The network's state dict in a checkpoint's contents (:func:`load_weights`).

    ``model.pt`` is the bare state dict (bundles >= 0.5.0, MONAI's ``CheckpointSaver`` for one
    object); a checkpoint of bundles < 0.5.0 (``{"model": state_dict}``) or a training's
    ``latest.pt`` holds it under ``key``. A state dict's values are tensors, so an entry ``key``
    holding a mapping can only be the nested form.
    """
    if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
        return state[key]
    return state


def _load_into(module, state, path) -> None:
    """``module.load_state_dict(state)``, a mismatch named with the file it came from."""
    try:
        unwrap(module).load_state_dict(state)
    except RuntimeError as e:  # missing/unexpected keys, other shapes: other widths, levels, channels
        first = str(e).strip().splitlines()
        raise CheckpointMismatchError(
            f"checkpoint {path} does not fit the network the configs build ({first[0] if first else e}); "
            "give the settings it was trained with (features, num_levels, in_channels)"
        ) from e


class LoadWeights:
    """Load a network's weights from a checkpoint when the engine starts, read with ``weights_only=True``.

    What ``evaluate.json`` and ``inference.json`` use instead of MONAI's ``CheckpointLoader``: a file
    that is not plain weights is refused with ``cannot read checkpoint … as weights``, and weights of
    another network with ``does not fit``, both naming the file.

    Args:
        load_path: the checkpoint (``models/model.pt``).
        network: the network to load into (a DDP wrapper is unwrapped).
        key: the entry of a nested checkpoint (``latest.pt``, or ``model.pt`` of bundles < 0.5.0:
            ``{"model": state_dict}``); a bare state dict (``model.pt``) is used as it is.
    """

    def __init__(self, load_path: str, network, key: str = "model") -> None:
        self.load_path = Path(load_path)
        self.network = network
        self.key = key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._load)

    def _load(self, engine: Engine) -> None:
        state = model_weights(load_weights(self.load_path), self.key)
        _load_into(self.network, state, self.load_path)
        logger.info("loaded %s", self.load_path)


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a reader never sees half a file


def _random_generators(root) -> list[np.random.RandomState]:
    """Every ``numpy.random.RandomState`` reachable from ``root`` (MONAI random transforms' ``R``), in a
    fixed order: the traversal MONAI's ``set_rnd`` uses, descending into every attribute."""
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, np.random.RandomState):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, type)):
            for key, value in vars(obj).items():
                if not key.startswith("__"):
                    visit(value)

    visit(root)
    return found


def _numpy_state(rs) -> dict:
    name, keys, pos, has_gauss, cached = rs.get_state() if hasattr(rs, "get_state") else rs
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_tuple(state: Mapping) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])


class RandomStates:
    """Every random stream a training run draws from, as a state dict that ``weights_only`` can load.

    torch's CPU (and CUDA) generators, numpy's and Python's global ones, and the private
    ``RandomState`` of each random transform reachable from ``transforms`` (MONAI gives every random
    transform its own; with ``num_workers=0`` they advance in the main process). With worker
    processes the transforms are re-seeded in each worker from torch's generator, so restoring that
    is enough.

    Args:
        transforms: the training ``Compose`` (or dataset), or ``None`` for the global streams only.
    """

    def __init__(self, transforms=None) -> None:
        self.transforms = transforms

    def state_dict(self) -> dict:
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.get_state()),  # noqa: NPY002 - the legacy stream MONAI draws from
            "python": random.getstate(),
            "transforms": [_numpy_state(r) for r in _random_generators(self.transforms)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # this process's device (one per rank)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        generators = _random_generators(self.transforms)
        if len(generators) != len(state["transforms"]):
            raise InvalidInputError(
                f"the checkpoint holds {len(state['transforms'])} random transform states but the "
                f"training transforms have {len(generators)}: resume with the configs it was saved with"
            )
        torch.set_rng_state(state["torch"])
        np.random.set_state(_numpy_tuple(state["numpy"]))  # noqa: NPY002
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        for r, s in zip(generators, state["transforms"]):
            r.set_state(_numpy_tuple(s))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class BestCheckpoint:
    """Save the network whenever the evaluator's key metric improves; the best survives a restart.

    Attach to the evaluator. Its :meth:`state_dict` (best score and epoch) goes into
    :class:`LatestCheckpoint`, so after a resume the first validation overwrites ``model.pt`` only
    if it is better than the best before the restart; the evaluator's ``best_metric`` (what
    ``StatsHandler`` reports) is restored with it.

    Args:
        save_path: the best model's file (``models/model.pt``), written as the network's bare state
            dict, like MONAI's ``CheckpointSaver`` with one object (``CheckpointLoader`` and
            ``monai.bundle ckpt_export`` read it without a key).
        network: the network (a DDP wrapper is unwrapped).
        metric_name: the metric to compare; default the evaluator's key metric.
        mode: ``"max"`` (higher is better) or ``"min"``.
    """

    def __init__(self, save_path: str, network, metric_name: str | None = None, mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise InvalidInputError(f"mode must be 'max' or 'min', got {mode!r}")
        self.save_path = Path(save_path)
        self.network = network
        self.metric_name = metric_name
        self.mode = mode
        self.best: float | None = None
        self.best_epoch = -1
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._check)

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def _check(self, engine: Engine) -> None:
        name = self.metric_name or getattr(engine.state, "key_metric_name", None)
        if name is None or name not in engine.state.metrics:
            raise InvalidInputError(f"BestCheckpoint: the evaluator has no metric {name!r} to compare")
        value = float(engine.state.metrics[name])
        if math.isnan(value) or not self._better(value):
            return
        self.best, self.best_epoch = value, int(engine.state.epoch)
        if idist.get_rank() == 0:
            _atomic_save(unwrap(self.network).state_dict(), self.save_path)
            logger.info(
                "new best %s %.4f at epoch %d: saved %s", name, value, self.best_epoch, self.save_path
            )

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: Mapping) -> None:
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_epoch = int(state.get("best_epoch", -1))
        if self._engine is not None and self.best is not None:  # what MONAI's evaluator reports as best
            self._engine.state.best_metric = self.best
            self._engine.state.best_metric_epoch = self.best_epoch


class LatestCheckpoint:
    """Save the training state after every epoch to one file and resume from it when a run starts.

    Saves each ``save_dict`` object's state dict (DDP unwrapped) and the trainer's epoch and
    iteration; restarting loads them back (on every rank) and training continues with the next
    epoch. A longer ``--epochs`` continues the run: a ``CosineAnnealingLR`` whose planned length
    changed goes on from its current learning rate down to its minimum over the remaining steps,
    instead of climbing back up the cosine. Save :class:`RandomStates` and :class:`BestCheckpoint`
    in ``save_dict`` too for an exact resume that keeps the best model.

    Args:
        save_path: checkpoint file (e.g. ``models/latest.pt``), replaced atomically each epoch.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler,
            :class:`RandomStates`, :class:`BestCheckpoint`).
        resume: load ``save_path`` at start when it exists.
        interval: save at the end of the first epoch after at least ``interval`` iterations since the
            last save (and after the last epoch); ``None``: after every epoch. Saves stay at epoch ends,
            so a resume continues exactly; a GPU epoch of a few seconds need not write ~0.5 GB each time.
    """

    def __init__(
        self, save_path: str, save_dict: Mapping, resume: bool = True, interval: int | None = None
    ) -> None:
        self.save_path = Path(save_path)
        self.save_dict = dict(save_dict)
        self.resume = resume
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int) or interval < 1
        ):
            raise ValueError(f"interval must be an integer >= 1 or None, got {interval!r}")
        self.interval = interval
        self._saved_at = 0
        # the planned length of each cosine schedule, as configured for this run (before any loading)
        self._planned = {k: o.T_max for k, o in self.save_dict.items() if isinstance(o, CosineAnnealingLR)}
        self._offset = dict.fromkeys(self._planned, 0)
        self._held: contextlib.ExitStack | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._lock)
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._load)
        engine.add_event_handler(Events.STARTED, self._start_count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)
        engine.add_event_handler(Events.COMPLETED, self._unlock)
        engine.add_event_handler(Events.TERMINATE, self._unlock)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _lock(self, engine: Engine) -> None:
        """One training per folder: rank 0 holds ``<folder>/.lock`` until the run ends (or dies)."""
        if idist.get_rank() != 0 or self._held is not None:
            return
        self.save_path.parent.mkdir(parents=True, exist_ok=True)
        held = contextlib.ExitStack()
        held.enter_context(exclusive_folder(self.save_path.parent, "training", "--bundle_root"))
        self._held = held

    def _unlock(self, engine: Engine) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def _failed(self, engine: Engine, error: BaseException) -> None:
        self._unlock(engine)
        raise error  # ignite hands an exception to its EXCEPTION_RAISED handlers instead of raising it

    def _load(self, engine: Engine) -> None:
        if not self.save_path.is_file():
            return
        ckpt = load_weights(self.save_path)
        self._check_same_data(engine, ckpt)
        random_states = None
        for key, obj in self.save_dict.items():
            if key not in ckpt:
                continue
            if isinstance(obj, RandomStates):
                random_states = (obj, ckpt[key])  # last: nothing below may draw from a stream after it
            elif isinstance(obj, torch.nn.Module):
                _load_into(obj, ckpt[key], self.save_path)
            else:
                unwrap(obj).load_state_dict(ckpt[key])
        for key, sched in self.save_dict.items():
            if key in self._planned:
                self._continue_schedule(key, sched, ckpt.get("schedules", {}).get(key, {}))
        trainer = ckpt.get("trainer", {})
        engine.state.epoch = int(trainer.get("epoch", 0))
        engine.state.iteration = int(trainer.get("iteration", 0))
        if random_states is not None:
            obj, state = random_states
            world = idist.get_world_size()
            per_rank = state if isinstance(state, list) else [state]
            if len(per_rank) == world:
                obj.load_state_dict(per_rank[idist.get_rank()])
            else:
                logger.warning(
                    "%s holds the random state of %d process(es), this run has %d: the random streams "
                    "restart from the seed (the resumed run will not repeat the interrupted one exactly)",
                    self.save_path,
                    len(per_rank),
                    world,
                )
        logger.info("resumed from %s at epoch %d", self.save_path, engine.state.epoch)
        if engine.state.epoch >= engine.state.max_epochs:
            logger.info("training already complete (%d epochs)", engine.state.epoch)
            engine.terminate()

    def _check_same_data(self, engine: Engine, ckpt: Mapping) -> None:
        """Refuse to resume with another batch size or training set: the restored iteration counter and
        random streams would no longer match the epochs (ignite would end the run early)."""
        saved = ckpt.get("data") or {}
        trainer = ckpt.get("trainer", {})
        epoch, iteration = int(trainer.get("epoch", 0)), int(trainer.get("iteration", 0))
        if "epoch_length" not in saved and epoch > 0:  # a latest.pt from before this check
            saved = {**saved, "epoch_length": iteration // epoch}
        now = _data_shape(engine)
        if saved.get("world_size", now["world_size"]) != now["world_size"]:
            # torchrun's ranks split the items, so a run of another world size has other epochs: only
            # the batch size can be compared (a single process resumes a torchrun's latest.pt)
            saved = {k: v for k, v in saved.items() if k == "batch_size"}
        for key, setting in (
            ("batch_size", "--batch_size"),
            ("items", "the number of training items (train.txt, --limit, --val_fraction, --train_fraction)"),
            ("epoch_length", "the iterations per epoch"),
        ):
            if key in saved and key in now and saved[key] != now[key]:
                raise InvalidInputError(
                    f"cannot resume from {self.save_path}: {setting} is {now[key]} but was {saved[key]} in "
                    f"the run it holds; resume with {saved[key]}, or start afresh with another --bundle_root "
                    f"(or delete {self.save_path})"
                )

    def _continue_schedule(self, key: str, sched: CosineAnnealingLR, saved: Mapping) -> None:
        """Keep a cosine schedule going when the run's planned length changed (``--epochs``)."""
        offset = int(saved.get("offset", 0))
        done = offset + sched.last_epoch
        planned = self._planned[key]
        # a latest.pt of gazemonai 0.1 has no plan: its schedule's own length was the plan
        was = int(saved.get("planned", offset + sched.T_max))
        if was != planned and planned > done:
            lr = [g["lr"] for g in sched.optimizer.param_groups]
            logger.info(
                "%s: the run is now %d steps long (was %d): the learning rate goes on from %s to %s over "
                "the remaining %d steps",
                key,
                planned,
                was,
                lr,
                sched.eta_min,
                planned - done,
            )
            # from the current rate, half a cosine down to eta_min over what is left of the run
            sched.T_max, sched.last_epoch, offset = planned - done, 0, done
        self._offset[key] = offset

    def _start_count(self, engine: Engine) -> None:
        self._saved_at = int(engine.state.iteration)  # 0, or where a resumed run starts

    def _save(self, engine: Engine) -> None:
        last = engine.state.epoch >= engine.state.max_epochs
        if self.interval is not None and not last and engine.state.iteration - self._saved_at < self.interval:
            return
        self._saved_at = int(engine.state.iteration)
        ckpt: dict = {}
        for key, obj in self.save_dict.items():
            if isinstance(obj, RandomStates) and idist.get_world_size() > 1:
                ckpt[key] = _gather(obj.state_dict())  # each rank has its own streams
            else:
                ckpt[key] = unwrap(obj).state_dict()
        ckpt["trainer"] = {"epoch": int(engine.state.epoch), "iteration": int(engine.state.iteration)}
        ckpt["data"] = _data_shape(engine)
        ckpt["schedules"] = {
            k: {"planned": self._planned[k], "offset": self._offset[k]} for k in self._planned
        }
        if idist.get_rank() == 0:
            _atomic_save(ckpt, self.save_path)


def _data_shape(engine: Engine) -> dict:
    """What fixes the iteration count and data order of an epoch: batch size, training items, iterations."""
    shape = {"world_size": int(idist.get_world_size())}
    if engine.state.epoch_length:
        shape["epoch_length"] = int(engine.state.epoch_length)
    loader = getattr(engine.state, "dataloader", None)
    if getattr(loader, "batch_size", None) is not None:
        shape["batch_size"] = int(loader.batch_size)
    with contextlib.suppress(TypeError, AttributeError):
        shape["items"] = len(loader.dataset)
    return shape


def _gather(state: dict) -> list[dict]:
    """Every rank's ``state``, in rank order (a collective: every rank must call it)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out
