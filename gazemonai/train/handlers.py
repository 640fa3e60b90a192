"""Ignite handlers and metrics for multi-level training: per-level Dice, reports, loss terms, progress.

The evaluators run :class:`~gazemonai.train.networks.MultiLevelNet` with ``output="stack"``, so each
prediction has channel 0 = the ensemble (mean of the levels' logits) and channel ``k`` = level ``k``.
After ``Activationsd(sigmoid)`` + ``AsDiscreted(threshold=0.5)`` each channel is scored against the
ground-truth mask by MONAI's ``DiceMetric``/``MeanIoU`` with ``ignore_empty=False`` (Dice = IoU = 1.0
where the prediction and the ground truth are both empty; GazeSup's code: 0.0) in MONAI's
``IgniteMetricHandler``, which gathers every rank's images. What MONAI lacks is here: picking one
channel (:class:`LevelOutput`), the per-level names (:func:`level_metrics`) and the JSON report of
the handlers' per-image scores (:class:`SegmentationReport`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.engines.utils import IterationEvents
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import DiceMetric, MeanIoU
from monai.utils import string_list_all_gather

from ..metrics import EMPTY_CONVENTION

__all__ = [
    "LevelOutput",
    "level_metric",
    "level_metrics",
    "metric_name",
    "SegmentationReport",
    "LossTerms",
    "IterationLimit",
    "init_tracking_store",
    "Progress",
]

logger = logging.getLogger(__name__)


class LevelOutput:
    """A metric's ``output_transform``: channel ``channel`` of each image's prediction, and the labels.

    Args:
        channel: prediction channel (0 = ensemble, k = level k with ``output="stack"``).
        keys: the prediction's and the label's keys in the engine output.
    """

    def __init__(self, channel: int = 0, keys: tuple[str, str] = ("pred", "label")) -> None:
        self.channel = int(channel)
        self.keys = list(keys)

    def __call__(self, output):
        preds, labels = from_engine(self.keys)(output)  # per image (C, ...), sizes may differ
        for p in preds:
            if self.channel >= p.shape[0]:
                raise ValueError(f"prediction has {p.shape[0]} channels; channel {self.channel} asked for")
        return [p[self.channel : self.channel + 1] for p in preds], labels


def metric_name(prefix: str, channel: int, iou: bool = False) -> str:
    """``<prefix>_mean_dice`` for the ensemble (channel 0), ``<prefix>_dice_level_<k>`` for level k."""
    kind = "iou" if iou else "dice"
    return f"{prefix}_mean_{kind}" if channel == 0 else f"{prefix}_{kind}_level_{channel}"


def level_metric(channel: int = 0, iou: bool = False) -> IgniteMetricHandler:
    """MONAI's mean Dice (or IoU) handler, ``ignore_empty=False``, of one prediction channel."""
    fn = MeanIoU(ignore_empty=False) if iou else DiceMetric(ignore_empty=False)
    return IgniteMetricHandler(metric_fn=fn, output_transform=LevelOutput(channel))


def level_metrics(num_levels: int, prefix: str = "val", iou: bool = False) -> dict[str, IgniteMetricHandler]:
    """``{metric_name(prefix, k): level_metric(k)}`` per level; with ``iou`` their IoU and the ensemble's."""
    out = {}
    for k in range(1, int(num_levels) + 1):
        out[metric_name(prefix, k)] = level_metric(k)
        if iou:
            out[metric_name(prefix, k, iou=True)] = level_metric(k, iou=True)
    if iou:
        out[metric_name(prefix, 0, iou=True)] = level_metric(0, iou=True)
    return out


class SegmentationReport:
    """Per-image and mean Dice/IoU of the ensemble and every level as one JSON file.

    The scores are the evaluator's metric handlers' (``<prefix>_mean_dice`` and
    :func:`level_metrics` with ``iou``): MONAI keeps every image's score, gathered from all ranks, in
    ``engine.state.metric_details`` (``MetricsSaver`` would write them as CSV tables). This writes
    the JSON that ``gazemonai evaluate``/``report``/``register``, MONAI Label and the MLflow artifact
    read, images in dataset order (also from an unshuffled ``DistributedSampler``).

    Args:
        output_path: JSON file written when the evaluation completes (by rank 0).
        prefix: the metric names' prefix (see :func:`metric_name`).
        id_key: batch key holding each image's id.
    """

    def __init__(self, output_path: str, prefix: str = "eval", id_key: str = "id") -> None:
        self.output_path = output_path
        self.prefix = prefix
        self.id_key = id_key
        self.ids: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.ids.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        self.ids += [str(b.get(self.id_key, len(self.ids) + i)) for i, b in enumerate(engine.state.batch)]

    def _write(self, engine: Engine) -> None:
        world = idist.get_world_size()
        ids = string_list_all_gather(self.ids) if world > 1 else list(self.ids)
        if idist.get_rank() != 0 or not ids:
            return
        details = getattr(engine.state, "metric_details", {})
        columns = {}
        for c in range(len(details) + 1):
            names = [metric_name(self.prefix, c), metric_name(self.prefix, c, iou=True)]
            if names[0] not in details:
                break
            if names[1] not in details:
                raise ValueError(f"SegmentationReport: no metric {names[1]} (level_metrics(..., iou=True))")
            columns["ensemble" if c == 0 else f"level_{c}"] = [details[n].reshape(-1).tolist() for n in names]
        if not columns:
            raise ValueError(f"SegmentationReport: no metric {metric_name(self.prefix, 0)} with details")
        order = _sampler_order(len(ids), world)
        rows = [
            {"id": ids[i], **{n: {"dice": d[i], "iou": j[i]} for n, (d, j) in columns.items()}} for i in order
        ]
        mean = {n: {"dice": sum(d) / len(d), "iou": sum(j) / len(j)} for n, (d, j) in columns.items()}
        report = {"images": len(rows), "mean": mean, "per_image": rows, "empty_convention": EMPTY_CONVENTION}
        Path(self.output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.output_path).write_text(json.dumps(report, indent=2))
        logger.info("metrics of %d images written to %s: %s", len(rows), self.output_path, mean)


def _sampler_order(n: int, world: int) -> list[int]:
    """Where each of ``n`` dataset items is in the ranks' gathered, concatenated lists.

    An unshuffled ``DistributedSampler`` gives rank ``r`` of ``world`` the items ``r, r + world,
    ...``; MONAI's gathers put rank 0's items first, then rank 1's, ...
    """
    starts = [sum(len(range(q, n, world)) for q in range(r)) for r in range(world)]
    return [starts[i % world] + i // world for i in range(n)]


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
