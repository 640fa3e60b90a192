"""Ignite handlers and metrics for multi-level training: per-level Dice, reports, loss terms, progress.

The evaluators run :class:`~gazemonai.train.networks.MultiLevelNet` with ``output="stack"``, so each
prediction has channel 0 = the ensemble (mean of the levels' logits) and channel ``k`` = level ``k``.
After ``Activationsd(sigmoid)`` + ``AsDiscreted(threshold=0.5)`` the metrics here score each channel
against the ground-truth mask with :func:`gazemonai.metrics.dice_iou` (Dice = IoU = 1.0 where the
prediction and the ground truth are both empty; GazeSup's code: 0.0), on the tensors' device: an
epoch's scores are read back to the host once, when they are reported.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.handlers import from_engine

from ..metrics import EMPTY_CONVENTION, dice_iou

__all__ = [
    "ChannelDice",
    "level_metrics",
    "SegmentationReport",
    "LossTerms",
    "IterationLimit",
    "init_tracking_store",
    "Progress",
]

logger = logging.getLogger(__name__)


def _channel_scores(output, channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``(dice, iou)`` tensors of prediction channel ``channel`` against the label.

    ``output`` is ``(preds, labels)``: batch tensors (B, C, ...) and (B, 1, ...), or lists of
    per-image (C, ...) and (1, ...) tensors, which may differ in size (evaluation at each image's own
    size).
    """
    preds, labels = output
    if isinstance(preds, torch.Tensor):
        preds, labels = [preds], [labels]
        batched = True
    else:
        preds = [p.unsqueeze(0) for p in preds]
        labels = [t.unsqueeze(0) for t in labels]
        batched = False
    dice, iou = [], []
    for p, t in zip(preds, labels):
        if channel >= p.shape[1]:
            raise ValueError(f"prediction has {p.shape[1]} channels; channel {channel} asked for")
        t = t[:, 0] if t.dim() == p.dim() else t
        d, j = dice_iou(p[:, channel], t, batch=True)
        dice.append(d)
        iou.append(j)
    return (dice[0], iou[0]) if batched else (torch.cat(dice), torch.cat(iou))


class ChannelDice(Metric):
    """Mean per-image Dice (or IoU) of one channel of a binarised prediction against the label.

    The scores are summed on the predictions' device; :meth:`compute` reads the sum once and
    averages over every rank's images (each rank of a distributed run sees its shard).

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
        self._sum: torch.Tensor | None = None
        self._count = 0

    def update(self, output) -> None:
        dice, iou = _channel_scores(output, self.channel)
        scores = (iou if self.iou else dice).sum()
        self._sum = scores if self._sum is None else self._sum + scores
        self._count += int(dice.shape[0])

    def compute(self) -> float:
        local = self._sum.cpu().double() if self._sum is not None else torch.zeros((), dtype=torch.float64)
        total = idist.all_reduce(torch.stack([local, torch.tensor(float(self._count), dtype=torch.float64)]))
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

    Each image's scores stay on the device until the evaluation completes; the file also states the
    empty-mask convention (:data:`gazemonai.metrics.EMPTY_CONVENTION`).

    Args:
        output_path: JSON file written when the evaluation completes.
        id_key: batch key holding each image's id.
        level_names: names of the prediction channels (default ``ensemble, level_1..``).
    """

    def __init__(self, output_path: str, id_key: str = "id", level_names: list[str] | None = None) -> None:
        self.output_path = output_path
        self.id_key = id_key
        self.level_names = level_names
        self.rows: list[tuple[str, list[str], torch.Tensor, torch.Tensor]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        for b, o in zip(batch, output):
            pred, label = o["pred"], o["label"]
            label = label[0] if label.dim() == pred.dim() else label
            names = self.level_names or ["ensemble"] + [f"level_{k}" for k in range(1, pred.shape[0])]
            if len(names) > pred.shape[0]:
                raise ValueError(
                    f"{len(names)} level_names {names} for a prediction of {pred.shape[0]} channels"
                )
            dice, iou = dice_iou(pred[: len(names)], label.expand_as(pred[: len(names)]), batch=True)
            self.rows.append((b.get(self.id_key, str(len(self.rows))), names, dice, iou))

    def _write(self, engine: Engine) -> None:
        rows = []
        for image_id, names, dice, iou in self.rows:
            row = {"id": image_id}
            for name, d, j in zip(names, dice.tolist(), iou.tolist()):
                row[name] = {"dice": d, "iou": j}
            rows.append(row)
        rows = _gather_in_sampler_order(rows)
        if rows is None or not rows:
            return
        names = [k for k in rows[0] if k != "id"]
        summary = {n: {m: float(np.mean([r[n][m] for r in rows])) for m in ("dice", "iou")} for n in names}
        report = {
            "images": len(rows),
            "mean": summary,
            "per_image": rows,
            "empty_convention": EMPTY_CONVENTION,
        }
        Path(self.output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.output_path).write_text(json.dumps(report, indent=2))
        logger.info("metrics of %d images written to %s: %s", len(rows), self.output_path, summary)


def _gather_in_sampler_order(rows: list) -> list | None:
    """All ranks' rows on rank 0 in dataset order (``None`` on the other ranks).

    Evaluation uses an unshuffled ``DistributedSampler``, which gives rank ``r`` the images
    ``r, r + W, r + 2W, ...`` of ``W`` ranks: interleaving the ranks' lists restores the dataset order.
    Outside a distributed run the rows are returned as they are.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return rows
    world = torch.distributed.get_world_size()
    if world == 1:
        return rows
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, rows)
    if torch.distributed.get_rank() != 0:
        return None
    longest = max(len(g) for g in gathered)
    return [g[i] for i in range(longest) for g in gathered if i < len(g)]


class LossTerms:
    """Each training iteration's loss terms in the engine output, their epoch means in its metrics.

    On ``LOSS_COMPLETED`` it sets ``engine.state.loss_terms`` to ``loss_function.terms(pred, label)``
    (per level: Dice, BCE, consistency; detached tensors on the device) unless the iteration did
    already (:class:`~gazemonai.train.low_memory.LevelwiseTrainStep` does), sums them on the device,
    and at the end of each epoch writes their means over the epoch (and over the ranks of a
    distributed run) to ``engine.state.metrics`` as ``<prefix>_<term>`` (e.g. ``train_loss_dice_1``),
    where ``StatsHandler`` and ``MLFlowHandler`` log them: one read from the device per epoch. (The
    terms live on the engine's state, not in ``engine.state.output``, which MONAI decollates into one
    item per image.) Computing them again costs ~1 % of a joint CPU step (64², batch 8, 2 levels).

    Args:
        loss_function: the trainer's :class:`~gazemonai.train.losses.MultiLevelGazeLoss`.
        prefix: metric name prefix.
    """

    def __init__(self, loss_function, prefix: str = "train_loss") -> None:
        self.loss_function = loss_function
        self.prefix = prefix
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._clear)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    @staticmethod
    def _clear(engine: Engine) -> None:
        engine.state.loss_terms = None

    def _collect(self, engine: Engine) -> None:
        if getattr(engine.state, "loss_terms", None) is None:
            out = engine.state.output
            engine.state.loss_terms = self.loss_function.terms(out["pred"], out["label"])
        for name, value in engine.state.loss_terms.items():
            value = value.detach()
            value = value.as_tensor() if hasattr(value, "as_tensor") else value
            value = value.to(torch.float32 if value.device.type == "mps" else torch.float64)
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        self._count += 1

    def _write(self, engine: Engine) -> None:
        if not self._count:
            return
        names = list(self._sums)
        sums = torch.stack([self._sums[n] for n in names]).cpu().double()
        totals = idist.all_reduce(torch.cat([sums, torch.tensor([float(self._count)], dtype=torch.float64)]))
        for name, value in zip(names, (totals[:-1] / totals[-1]).tolist()):
            engine.state.metrics[f"{self.prefix}_{name}"] = value


class IterationLimit:
    """Stop training after exactly ``max_iterations`` iterations, the last epoch cut short.

    GazeSup (Zhong et al., MICCAI 2024) trains for a number of iterations (15 000), not of epochs.
    This handler ends the epoch in which the limit falls at the limit, and the run with it. The cut
    epoch still completes (``EPOCH_COMPLETED`` fires), so the final weights are validated and saved
    in ``latest.pt`` (ignite's own ``run(max_iters=...)`` stops without that). It only ever cuts: the
    trainer's ``max_epochs`` still bounds the run, so an explicit ``--epochs 1`` gives one epoch. The
    paper profile therefore sets ``epochs`` to one more than ``ceil(iterations / epoch length)``: a run
    resumed after a cut epoch with a larger ``iterations`` (whole epochs from there) still reaches the
    limit. A run resumed at or past the limit stops at once; a killed run resumes from its last saved
    epoch and replays to the limit.

    Args:
        max_iterations: the limit; ``None`` (the CPU profile) leaves the epochs alone.
    """

    def __init__(self, max_iterations: int | None = None) -> None:
        if max_iterations is not None and (
            not isinstance(max_iterations, int) or isinstance(max_iterations, bool) or max_iterations < 1
        ):
            raise ValueError(f"iterations must be an integer >= 1 or None, got {max_iterations!r}")
        self.max_iterations = max_iterations

    def attach(self, engine: Engine) -> None:
        if self.max_iterations is None:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)

    def _epoch_started(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_iterations:  # resumed at the limit: nothing left to do
            logger.info("training already complete (%d iterations)", engine.state.iteration)
            engine.terminate()

    def _iteration_completed(self, engine: Engine) -> None:
        if engine.state.iteration >= self.max_iterations:
            engine.state.max_epochs = engine.state.epoch  # this epoch is the last
            engine.terminate_epoch()  # EPOCH_COMPLETED still fires


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

    from .tracking import fail_fast_http, is_outage

    fail_fast_http()
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        try:
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        except Exception as e:  # a server that is down: training goes on (MLflowTracking keeps the records)
            if not is_outage(e):
                raise
            logger.warning("MLflow tracking at %s is unreachable: %s", tracking_uri, e)
    if distributed:
        dist.barrier()
    return tracking_uri


class Progress:
    """Ignite's ``ProgressBar`` on a terminal; plain periodic log lines in a log file or a pipe.

    A progress bar redraws its line with carriage returns: written to a file, every redraw is a frame
    and log records written meanwhile are glued onto the bar's line. So the bar is drawn only when its
    stream is a terminal; otherwise about ``lines`` records per epoch are logged, each on a line of
    its own: ``<desc> epoch E/N: iteration I/L``.

    Args:
        desc: what runs (the bar's description, the records' first word).
        persist: keep the bar on screen after each epoch (terminal only).
        lines: records per epoch when the stream is not a terminal (0: none).
        stream: where the bar would go; default ``sys.stderr`` (tqdm's), read when attached.
    """

    def __init__(self, desc: str = "train", persist: bool = False, lines: int = 4, stream=None) -> None:
        self.desc = desc
        self.persist = persist
        self.lines = int(lines)
        self.stream = stream

    def attach(self, engine: Engine) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        if stream is not None and hasattr(stream, "isatty") and stream.isatty():
            from ignite.handlers import ProgressBar

            ProgressBar(persist=self.persist, desc=self.desc, file=stream).attach(engine)
        elif self.lines > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._log)

    def _log(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        if not length:
            return
        done = (engine.state.iteration - 1) % length + 1
        if done % math.ceil(length / self.lines) and done != length:
            return
        state = engine.state
        of = "" if isinstance(engine, Evaluator) else f"/{state.max_epochs}"  # an evaluator's: the trainer's
        logger.info("%s epoch %d%s: iteration %d/%d", self.desc, state.epoch, of, done, length)
