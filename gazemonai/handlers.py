"""Ignite handlers and metrics for multi-level training: per-level Dice, reports, resumable checkpoints.

The evaluators run :class:`~gazemonai.networks.MultiLevelNet` with ``output="stack"``, so each
prediction has channel 0 = the ensemble (mean of the levels' logits) and channel ``k`` = level ``k``.
After ``Activationsd(sigmoid)`` + ``AsDiscreted(threshold=0.5)`` the metrics here score each channel
against the ground-truth mask.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.handlers import from_engine

__all__ = [
    "ChannelDice",
    "level_metrics",
    "SegmentationReport",
    "LatestCheckpoint",
    "dice_iou",
    "init_tracking_store",
]

logger = logging.getLogger(__name__)


def dice_iou(pred: torch.Tensor, label: torch.Tensor) -> tuple[float, float]:
    """Dice and IoU of two binary maps (1.0 for both when both are empty)."""
    p = pred.bool()
    t = label.bool()
    inter = (p & t).sum().item()
    ps, ts = p.sum().item(), t.sum().item()
    if ps + ts == 0:
        return 1.0, 1.0
    return 2.0 * inter / (ps + ts), inter / (ps + ts - inter)


def _pairs(output):
    preds, labels = output
    if isinstance(preds, torch.Tensor) and preds.dim() == 4:  # a batch tensor
        preds, labels = list(preds), list(labels)
    return preds, labels


class ChannelDice(Metric):
    """Mean per-image Dice (or IoU) of one channel of a binarised prediction against the label.

    Args:
        channel: prediction channel (0 = ensemble, k = level k with ``output="stack"``).
        iou: report IoU instead of Dice.
        output_transform: picks ``(preds, labels)`` from the engine output.
    """

    def __init__(self, channel: int = 0, iou: bool = False, output_transform=None):
        self.channel = int(channel)
        self.iou = iou
        super().__init__(output_transform=output_transform or from_engine(["pred", "label"]))

    def reset(self) -> None:
        self._scores: list[float] = []

    def update(self, output) -> None:
        for p, t in zip(*_pairs(output)):
            if self.channel >= p.shape[0]:
                raise ValueError(f"prediction has {p.shape[0]} channels; channel {self.channel} asked for")
            d, j = dice_iou(p[self.channel], t[0] if t.dim() == p.dim() else t)
            self._scores.append(j if self.iou else d)

    def compute(self) -> float:
        # the mean over every rank's images (each rank of a distributed run sees its shard)
        import ignite.distributed as idist

        total = torch.tensor([float(np.sum(self._scores)), float(len(self._scores))], dtype=torch.float64)
        total = idist.all_reduce(total)
        return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def level_metrics(num_levels: int, prefix: str = "val", iou: bool = False) -> dict[str, ChannelDice]:
    """``{f"{prefix}_dice_level_{k}": ChannelDice(k)}`` for every level (and IoU ones with ``iou``)."""
    out: dict[str, ChannelDice] = {}
    for k in range(1, int(num_levels) + 1):
        out[f"{prefix}_dice_level_{k}"] = ChannelDice(k)
        if iou:
            out[f"{prefix}_iou_level_{k}"] = ChannelDice(k, iou=True)
    if iou:
        out[f"{prefix}_mean_iou"] = ChannelDice(0, iou=True)
    return out


class SegmentationReport:
    """Write per-image and mean Dice/IoU of the ensemble and every level to a JSON file.

    Args:
        output_path: JSON file written when the evaluation completes.
        id_key: batch key holding each image's id.
        level_names: names of the prediction channels (default ``ensemble, level_1..``).
    """

    def __init__(self, output_path: str, id_key: str = "id", level_names: list[str] | None = None) -> None:
        self.output_path = output_path
        self.id_key = id_key
        self.level_names = level_names
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        for b, o in zip(batch, output):
            pred, label = o["pred"], o["label"]
            names = self.level_names or ["ensemble"] + [f"level_{k}" for k in range(1, pred.shape[0])]
            row = {"id": b.get(self.id_key, str(len(self.rows)))}
            for c, name in enumerate(names):
                d, j = dice_iou(pred[c], label[0] if label.dim() == pred.dim() else label)
                row[name] = {"dice": d, "iou": j}
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        if not self.rows:
            return
        names = [k for k in self.rows[0] if k != "id"]
        summary = {
            n: {m: float(np.mean([r[n][m] for r in self.rows])) for m in ("dice", "iou")} for n in names
        }
        report = {"images": len(self.rows), "mean": summary, "per_image": self.rows}
        Path(self.output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.output_path).write_text(json.dumps(report, indent=2))
        logger.info("metrics of %d images written to %s: %s", len(self.rows), self.output_path, summary)


class LatestCheckpoint:
    """Save the training state every epoch to one file and resume from it when a run starts.

    Args:
        save_path: checkpoint file (e.g. ``models/latest.pt``), replaced atomically each epoch.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, scheduler);
            the trainer's own state (epoch, iteration) is added as ``"trainer"``.
        resume: load ``save_path`` at start when it exists.
    """

    def __init__(self, save_path: str, save_dict: dict, resume: bool = True) -> None:
        self.save_path = Path(save_path)
        self.save_dict = save_dict
        self.resume = resume

    def attach(self, engine: Engine) -> None:
        if self.resume:
            engine.add_event_handler(Events.STARTED, self._load)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _load(self, engine: Engine) -> None:
        if not self.save_path.is_file():
            return
        ckpt = torch.load(self.save_path, map_location="cpu", weights_only=False)
        for k, obj in self.save_dict.items():
            if k in ckpt:
                obj.load_state_dict(ckpt[k])
        state = ckpt.get("trainer", {})
        engine.state.epoch = int(state.get("epoch", 0))
        engine.state.iteration = int(state.get("iteration", 0))
        logger.info("resumed from %s at epoch %d", self.save_path, engine.state.epoch)
        if engine.state.epoch >= engine.state.max_epochs:
            logger.info("training already complete (%d epochs)", engine.state.epoch)
            engine.terminate()

    def _save(self, engine: Engine) -> None:
        ckpt = {k: obj.state_dict() for k, obj in self.save_dict.items()}
        ckpt["trainer"] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        self.save_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.save_path.with_name(self.save_path.name + ".tmp")
        torch.save(ckpt, tmp)
        os.replace(tmp, self.save_path)


def init_tracking_store(tracking_uri: str) -> str:
    """Create or upgrade the MLflow store once, on rank 0, before other ranks open it.

    Every rank of a distributed run instantiates the configs' ``MLFlowHandler`` (only rank 0 attaches
    it), and opening a new SQLite store runs its schema migration: two ranks doing so at once fail
    (``alembic ... expected to match one row``). Rank 0 opens the store, then all ranks meet at a
    barrier. Without ``torch.distributed`` it just opens the store.

    Returns:
        ``tracking_uri``.
    """
    import torch.distributed as dist
    from mlflow.tracking import MlflowClient

    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    if distributed:
        dist.barrier()
    return tracking_uri
