"""Training state that survives a restart: MONAI's and Ignite's checkpoint handlers, and what they lack.

``train.json`` writes two files under ``<bundle_root>/models``. ``model.pt``: MONAI's
``CheckpointSaver`` (``key_metric_filename: model.pt``, as the model zoo configures it) writes the
network's bare state dict whenever the validation key metric improves, so the zoo's ``ckpt_export``
loads it as is (bundles < 0.5.0 wrote ``{"model": state_dict}``; MONAI's loader with the key
``model`` and :func:`model_weights` read both). ``latest.pt``: Ignite's ``Checkpoint``
(:class:`IntervalCheckpoint`) of the network, optimizer, schedule, best score (:class:`BestMetric`),
the trainer's place (:class:`TrainerState`) and every random stream (:class:`RandomStates`), at epoch
ends, loaded by MONAI's ``CheckpointLoader`` (:class:`CheckedCheckpointLoader`) when a run starts. A
run killed at any moment (even ``kill -9``) and resumed ends with the same weights and metrics, to the
bit on a CPU, as one never interrupted: the interrupted epoch is replayed from the same random state.

Both are read with ``weights_only=True``: a checkpoint handed to you cannot run code. Every rank loads
``latest.pt`` and rank 0 writes it without DDP's ``module.`` prefix, so a single process can resume a
torchrun's run and the other way round.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

from ..errors import CheckpointMismatchError, CheckpointReadError, InvalidInputError
from ..prep.io import exclusive_folder

__all__ = [
    "BestMetric", "CheckedCheckpointLoader", "IntervalCheckpoint", "RandomStates", "TrainerState",
    "check_checkpoint_file", "load_weights", "model_weights", "unwrap",
]  # fmt: skip

logger = logging.getLogger(__name__)


def unwrap(obj):
    """The module inside ``DistributedDataParallel``/``DataParallel`` (or ``obj`` itself)."""
    return (
        obj.module
        if isinstance(obj, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))
        else obj
    )


@contextlib.contextmanager
def _reading(path):
    """Turn what ``torch.load(path, weights_only=True)`` raises on a bad file into ``CheckpointReadError``."""
    reason = _not_a_checkpoint(Path(path))
    if reason:  # a text file, an image, a truncated archive
        raise CheckpointReadError(f"cannot read checkpoint {path} as weights: {reason}")
    try:
        yield
    except (pickle.UnpicklingError, EOFError) as e:  # more than weights (a crafted pickle), or cut short
        raise CheckpointReadError(f"cannot read checkpoint {path} as weights: {type(e).__name__} {e}") from e
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):  # e.g. out of memory: not the file's fault
            raise
        raise CheckpointReadError(f"cannot read checkpoint {path} as weights: {e}") from e


def load_weights(path: str | os.PathLike, map_location="cpu"):
    """A checkpoint's contents, read with ``weights_only=True`` (no code in the file can run).

    Raises:
        CheckpointReadError: the file is not a torch checkpoint of plain weights and numbers (a
            corrupt or truncated file, or one that would need code to load); the cause is kept.
    """
    with _reading(path):
        return torch.load(path, map_location=map_location, weights_only=True)


def _not_a_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot be a torch checkpoint, by its first bytes, or ``None``.

    ``torch.save`` writes a zip archive (or, in the legacy format, a pickle starting with protocol
    byte ``0x80``); a text file, an image or a truncated archive is neither.
    """
    with open(path, "rb") as f:
        head = f.read(2)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return None
    kind = "empty" if not head else "a text file" if head.decode("latin-1").isprintable() else "not one"
    return f"not a torch checkpoint ({kind}; torch.save writes a zip archive)"


def check_checkpoint_file(path: str | os.PathLike) -> Path:
    """Refuse a file that cannot be a torch checkpoint, by its first bytes, before it is copied or staged,
    naming the user's file rather than the staged copy a later read would name.

    Raises:
        CheckpointReadError: naming ``path``.
    """
    path = Path(path)
    reason = _not_a_checkpoint(path)
    if reason:
        raise CheckpointReadError(f"checkpoint {path} is {reason}")
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


class CheckedCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader``, whose failures name the file and say what is wrong with it.

    MONAI's loader reads with ``weights_only=True``, unwraps DDP and takes a bare state dict for a
    single object (``model.pt``) as well as ``{"model": state_dict}`` (``model.pt`` of bundles < 0.5.0,
    ``latest.pt``). What it lacks: a file that is not plain weights is refused with ``cannot read
    checkpoint … as weights`` (:class:`~gazemonai.errors.CheckpointReadError`; a crafted pickle never
    runs), weights of another network with ``… does not fit the network the configs build``
    (:class:`~gazemonai.errors.CheckpointMismatchError`); and a loaded training state is logged as
    ``resumed from <file> at epoch N``.

    Args:
        load_path: the checkpoint.
        load_dict: the objects to load into, e.g. ``{"model": network}`` or the training's ``save_dict``.
        map_location: where tensors are read to (default the CPU: ``load_state_dict`` copies them to
            the network's device; a GPU's checkpoint loads on a CPU-only machine).
        kwargs: the other arguments of MONAI's ``CheckpointLoader``.
    """

    def __init__(self, load_path: str, load_dict: dict, map_location="cpu", **kwargs) -> None:
        super().__init__(load_path, load_dict, map_location=map_location, **kwargs)

    def __call__(self, engine: Engine) -> None:
        path = self.load_path
        with _reading(path):
            try:
                super().__call__(engine)
            except RuntimeError as e:
                if "Error(s) in loading state_dict" not in str(e):
                    raise
                first = str(e).strip().splitlines()[0]  # missing/unexpected keys, other shapes
                raise CheckpointMismatchError(
                    f"checkpoint {path} does not fit the network the configs build ({first}); "
                    "give the settings it was trained with (features, num_levels, in_channels)"
                ) from e
        if engine.state.epoch:
            logger.info("resumed from %s at epoch %d", path, engine.state.epoch)
        else:
            logger.info("loaded %s", path)


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
    keys = state["keys"].cpu().numpy().astype(np.uint32)
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

    def state_dict(self) -> dict | list[dict]:
        """This process's streams; under ``torch.distributed`` every rank's, in rank order (a collective)."""
        state = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state(np.random.get_state()),  # noqa: NPY002 - the legacy stream MONAI draws from
            "python": random.getstate(),
            "transforms": [_numpy_state(r) for r in _random_generators(self.transforms)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()  # this process's device (one per rank)
        return _gather(state) if idist.get_world_size() > 1 else state

    def load_state_dict(self, state: Mapping | list) -> None:
        """Restore this process's streams (of a list, this rank's); another world size keeps the seed's."""
        per_rank = state if isinstance(state, list) else [state]
        if len(per_rank) != idist.get_world_size():
            logger.warning(
                "the checkpoint holds the random state of %d process(es), this run has %d: the random "
                "streams restart from the seed (the resumed run will not repeat the interrupted one exactly)",
                len(per_rank),
                idist.get_world_size(),
            )
            return
        state = per_rank[idist.get_rank()]
        generators = _random_generators(self.transforms)
        if len(generators) != len(state["transforms"]):
            raise InvalidInputError(
                f"the checkpoint holds {len(state['transforms'])} random transform states but the "
                f"training transforms have {len(generators)}: resume with the configs it was saved with"
            )
        torch.set_rng_state(state["torch"].cpu())
        np.random.set_state(_numpy_tuple(state["numpy"]))  # noqa: NPY002
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        for r, s in zip(generators, state["transforms"]):
            r.set_state(_numpy_tuple(s))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"].cpu())


def _gather(state: dict) -> list[dict]:
    """Every rank's ``state``, in rank order (a collective: every rank must call it)."""
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


class _ReplacedFile(DiskSaver):
    """Ignite's ``DiskSaver`` (atomic: written to a temporary file, then ``os.replace``d) for a file each
    save replaces: removing the previous one first, as ``Checkpoint`` asks, would leave no file while
    the new one is written."""

    def remove(self, filename: str) -> None:
        pass


class IntervalCheckpoint(Checkpoint):
    """Ignite's ``Checkpoint`` of ``save_dict`` to one file (``latest.pt``), at the end of epochs.

    MONAI's ``CheckpointSaver`` names interval checkpoints ``checkpoint_epoch=N.pt`` and writes them
    in place after deleting the previous one; this replaces one file atomically (a kill while saving
    keeps the previous one), at epoch ends only, so a resume continues exactly.

    Args:
        save_path: the file (``models/latest.pt``).
        save_dict: objects with ``state_dict``/``load_state_dict`` (DDP is unwrapped); written by rank 0.
        interval: save at the end of the first epoch at least ``interval`` iterations after the last
            save (and after the last epoch), so a GPU epoch of a few seconds need not write ~0.5 GB
            each time; ``None``: after every epoch.
    """

    def __init__(self, save_path: str, save_dict: Mapping, interval: int | None = None) -> None:
        if interval is not None and (
            isinstance(interval, bool) or not isinstance(interval, int) or interval < 1
        ):
            raise ValueError(f"interval must be an integer >= 1 or None, got {interval!r}")
        path = Path(save_path)
        saver = _ReplacedFile(path.parent, atomic=True, require_empty=False)
        super().__init__(dict(save_dict), saver, filename_pattern=path.name, n_saved=1)
        self.interval = interval
        self._saved_at = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start_count)
        engine.add_event_handler(Events.EPOCH_COMPLETED(event_filter=self._due), self)

    def _start_count(self, engine: Engine) -> None:
        self._saved_at = int(engine.state.iteration)  # 0, or where a resumed run starts

    def _due(self, engine: Engine, epoch: int) -> bool:
        last = engine.state.epoch >= engine.state.max_epochs
        if self.interval is not None and not last and engine.state.iteration - self._saved_at < self.interval:
            return False
        self._saved_at = int(engine.state.iteration)
        return True


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


class TrainerState:
    """The trainer's place in the run, as one more object of the training's ``save_dict``.

    What MONAI's ``CheckpointLoader`` and Ignite's ``Checkpoint`` lack for an exact resume of a bundle:

    * the trainer's epoch and iteration (the trainer cannot be in its own handlers' ``save_dict``);
    * a refusal to resume with another batch size or training set, whose iteration counter and random
      streams would no longer match the epochs (a run of another world size compares the batch size
      only: torchrun's ranks split the items);
    * a longer run (``--epochs``) continues a ``CosineAnnealingLR`` from its current learning rate down
      to its minimum over the remaining steps, instead of climbing back up the cosine;
    * one training per folder: attached to the trainer, rank 0 holds ``<folder>/.lock`` until the run
      ends (or dies).

    Args:
        checkpoint: the training state's file (``models/latest.pt``), for messages; its folder is locked.
        lr_scheduler: the cosine schedule a longer run extends (``None``: none).
    """

    def __init__(self, checkpoint: str, lr_scheduler=None) -> None:
        self.checkpoint = Path(checkpoint)
        self.lr_scheduler = lr_scheduler
        cosine = isinstance(lr_scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
        self._planned = lr_scheduler.T_max if cosine else None  # as configured for this run, before loading
        self._offset = 0
        self._engine: Engine | None = None
        self._held: contextlib.ExitStack | None = None

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        engine.add_event_handler(Events.STARTED, self._lock)
        engine.add_event_handler(Events.COMPLETED, self._unlock)
        engine.add_event_handler(Events.TERMINATE, self._unlock)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _lock(self, engine: Engine) -> None:
        if idist.get_rank() == 0 and self._held is None:
            self._held = contextlib.ExitStack()
            self._held.enter_context(exclusive_folder(self.checkpoint.parent, "training", "--bundle_root"))

    def _unlock(self, engine: Engine) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def _failed(self, engine: Engine, error: BaseException) -> None:
        self._unlock(engine)
        raise error  # ignite hands an exception to its EXCEPTION_RAISED handlers instead of raising it

    def state_dict(self) -> dict:
        state, plan = self._engine.state, {"planned": self._planned, "offset": self._offset}
        data = _data_shape(self._engine)
        return {"epoch": int(state.epoch), "iteration": int(state.iteration), "data": data, "schedule": plan}

    def load_state_dict(self, saved: Mapping) -> None:
        """Resume the trainer; called by the loader after the network, optimizer and schedule."""
        engine = self._engine
        epoch, iteration = int(saved.get("epoch", 0)), int(saved.get("iteration", 0))
        self._check_same_data(saved.get("data") or {}, epoch, iteration)
        if self._planned is not None:
            self._continue_schedule(saved.get("schedule") or {})
        if epoch > engine.state.max_epochs:  # MONAI's loader would raise a ValueError naming no setting
            raise InvalidInputError(
                f"cannot resume from {self.checkpoint}: it has trained {epoch} epochs, more than the "
                f"{engine.state.max_epochs} of this run; give --epochs {epoch} or more (--iterations in the "
                "paper profile), or another --bundle_root"
            )
        engine.state.epoch, engine.state.iteration = epoch, iteration
        if epoch == engine.state.max_epochs:
            logger.info("training already complete (%d epochs)", epoch)

    def _check_same_data(self, saved: Mapping, epoch: int, iteration: int) -> None:
        if "epoch_length" not in saved and epoch > 0:  # a latest.pt from before this check
            saved = {**saved, "epoch_length": iteration // epoch}
        now = _data_shape(self._engine)
        if saved.get("world_size", now["world_size"]) != now["world_size"]:
            saved = {k: v for k, v in saved.items() if k == "batch_size"}
        for key, setting in (
            ("batch_size", "--batch_size"),
            ("items", "the number of training items (train.txt, --limit, --val_fraction, --train_fraction)"),
            ("epoch_length", "the iterations per epoch"),
        ):
            if key in saved and key in now and saved[key] != now[key]:
                raise InvalidInputError(
                    f"cannot resume from {self.checkpoint}: {setting} is {now[key]} but was {saved[key]} in "
                    f"the run it holds; resume with {saved[key]}, or start afresh with another --bundle_root "
                    f"(or delete {self.checkpoint})"
                )

    def _continue_schedule(self, saved: Mapping) -> None:
        sched, planned = self.lr_scheduler, self._planned
        offset = int(saved.get("offset", 0))
        done = offset + sched.last_epoch
        was = int(saved.get("planned", offset + sched.T_max))  # gazemonai 0.1: no plan, its length was it
        if was != planned and planned > done:
            logger.info(
                "the run is now %d steps long (was %d): the learning rate goes on from %s to %s over the "
                "remaining %d steps",
                planned,
                was,
                [g["lr"] for g in sched.optimizer.param_groups],
                sched.eta_min,
                planned - done,
            )
            # from the current rate, half a cosine down to eta_min over what is left of the run
            sched.T_max, sched.last_epoch, offset = planned - done, 0, done
        self._offset = offset


class BestMetric:
    """The best validation score so far, kept in ``latest.pt`` so a resumed run keeps the best model.

    MONAI's ``CheckpointSaver`` (``save_key_metric``) writes ``model.pt`` when the key metric beats
    the best it has seen, and can ``load_state_dict`` that record but has no ``state_dict``; MONAI's
    evaluator keeps the same best (``state.best_metric``, what ``StatsHandler`` reports). This saves
    the evaluator's and restores both, so the first validation after a resume overwrites
    ``model.pt`` only if it beats the best before the restart.

    Args:
        evaluator: MONAI's evaluator whose key metric selects the model.
        saver: MONAI's ``CheckpointSaver`` attached to it with ``save_key_metric=True`` (its key metric
            compared as it is, not ``key_metric_negative_sign``).
    """

    def __init__(self, evaluator, saver) -> None:
        self.evaluator = evaluator
        self.saver = saver

    def state_dict(self) -> dict:
        state = self.evaluator.state
        epoch = int(getattr(state, "best_metric_epoch", -1))
        return {"best": float(state.best_metric) if epoch >= 0 else None, "best_epoch": epoch}

    def load_state_dict(self, saved: Mapping) -> None:
        if saved.get("best") is None:
            return
        self.evaluator.state.best_metric = float(saved["best"])
        self.evaluator.state.best_metric_epoch = int(saved.get("best_epoch", -1))
        self.saver.load_state_dict({"_saved": [(float(saved["best"]), "model.pt")]})
