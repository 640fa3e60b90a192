"""Pictures of a run: what the gaze became, what the network learnt, how well it segments.

:func:`write_report` writes PNG files and one self-contained HTML page (the pictures are embedded)
into a folder:

* ``samples/<id>.png``, one per sample image: the image with its fixations (circles whose area
  grows with the fixation's duration, numbered in viewing order), the duration-weighted heatmap, the
  CRF-refined map, each pseudo-mask level, the network's prediction and the ground truth, the masks
  drawn as outlines on the image;
* ``curves.png``: the training curves from the run's MLflow store (training loss and its terms per
  epoch, validation Dice of the ensemble and of each level, learning rate);
* ``dice.png``: the per-image Dice distribution of an evaluation report (``metrics_<split>.json``),
  ensemble and levels;
* ``report.html``: all of the above with the run's settings and mean scores.

With an evaluation report the samples span its Dice range (worst, quantiles, best); otherwise they
are drawn at random (seeded) among the images with fixations.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InvalidInputError, MissingInputError
from .gaze.fixations import ImageFixations, read_fixation_csv
from .gaze.pseudo_masks import PRESETS, PseudoMaskConfig, make_pseudo_masks
from .metrics import dice_iou
from .prep.io import read_image, read_mask, resolve_in_folder

__all__ = ["Sample", "curves_figure", "dice_figure", "sample_figure", "write_report"]

logger = logging.getLogger(__name__)

#: outline colours: pseudo-mask levels, prediction, ground truth
LEVEL_COLOURS = ("#ffb000", "#fe6100", "#dc267f", "#785ef0")
PRED_COLOUR, GT_COLOUR = "#00e5ff", "#39ff14"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Sample:
    """One image and everything drawn for it.

    Args:
        id: the image id (file stem).
        image: (H, W[, 3]) image as read.
        fixations: the image's fixations (``None``: no gaze recorded).
        heatmap, refined: (H, W) maps in [0, 1] (``None`` without fixations).
        levels: (N, H, W) 0/1 pseudo-masks (``None`` without fixations).
        prediction: (H, W) 0/1 mask of the network (``None``: no model given).
        label: (H, W) 0/1 ground truth (``None``: no mask on disk).
    """

    id: str
    image: np.ndarray
    fixations: ImageFixations | None = None
    heatmap: np.ndarray | None = None
    refined: np.ndarray | None = None
    levels: np.ndarray | None = None
    prediction: np.ndarray | None = None
    label: np.ndarray | None = None
    scores: dict = field(default_factory=dict)


def _show_image(ax, image: np.ndarray) -> None:
    image = np.asarray(image)
    if image.ndim == 2:
        low, high = np.percentile(image, (1, 99)) if image.size else (0, 1)
        ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1)
    else:
        ax.imshow(image[..., :3].astype(np.uint8) if image.dtype != np.uint8 else image[..., :3])
    ax.set_axis_off()


def _outline(ax, mask: np.ndarray, colour: str, width: float = 1.6) -> None:
    """``mask`` over the image: a light fill (a mask covering the whole image shows too) and its outline."""
    if mask is None or not np.any(mask):
        return
    from matplotlib.colors import ListedColormap

    mask = np.asarray(mask) > 0
    fill = np.ma.masked_where(~mask, mask)
    ax.imshow(fill, cmap=ListedColormap([colour]), alpha=0.3, interpolation="nearest")
    ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=width)


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    import torch

    d, _ = dice_iou(torch.as_tensor(pred[None, None] > 0), torch.as_tensor(label[None, None] > 0))
    return float(d.reshape(-1)[0])


def sample_figure(sample: Sample):
    """One row of panels for ``sample`` (see the module docstring); a matplotlib ``Figure``."""
    plt = _pyplot()
    panels = ["gaze"]
    if sample.heatmap is not None:
        panels += ["heatmap", "refined"] + [f"level {k + 1}" for k in range(len(sample.levels))]
    if sample.prediction is not None:
        panels.append("prediction")
    if sample.label is not None:
        panels.append("ground truth")
    h, w = np.asarray(sample.image).shape[:2]
    size = 2.6
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) * w / max(h, w) + 0.2, size + 0.5))
    axes = np.atleast_1d(axes)
    for ax, panel in zip(axes, panels):
        if panel == "gaze":
            _show_image(ax, sample.image)
            fx = sample.fixations
            if fx is not None and len(fx):
                x, y = fx.xy[:, 0] * w, fx.xy[:, 1] * h
                area = 40 + 360 * fx.duration / max(float(fx.duration.max()), 1e-6)
                ax.plot(x, y, "-", color="white", linewidth=0.7, alpha=0.7)
                ax.scatter(x, y, s=area, facecolors="none", edgecolors="#ffe000", linewidths=1.4)
                for i, (xi, yi) in enumerate(zip(x, y)):
                    ax.annotate(str(i + 1), (xi, yi), color="white", fontsize=6, ha="center", va="center")
                title = f"{len(fx)} fixations, {fx.duration.sum() / 1000:.1f} s"
            else:
                title = "no fixations"
            ax.set_title(title, fontsize=8)
        elif panel in ("heatmap", "refined"):
            ax.imshow(sample.heatmap if panel == "heatmap" else sample.refined, cmap="magma", vmin=0, vmax=1)
            ax.set_axis_off()
            ax.set_title("gaze heatmap" if panel == "heatmap" else "CRF-refined", fontsize=8)
        elif panel.startswith("level"):
            k = int(panel.split()[1]) - 1
            _show_image(ax, sample.image)
            _outline(ax, sample.levels[k], LEVEL_COLOURS[k % len(LEVEL_COLOURS)])
            score = sample.scores.get(f"level_{k + 1}_pseudo")
            ax.set_title(
                f"pseudo-mask {k + 1}" + (f" (Dice {score:.2f})" if score is not None else ""), fontsize=8
            )
        elif panel == "prediction":
            _show_image(ax, sample.image)
            _outline(ax, sample.prediction, PRED_COLOUR)
            score = sample.scores.get("prediction")
            ax.set_title("prediction" + (f" (Dice {score:.2f})" if score is not None else ""), fontsize=8)
        else:
            _show_image(ax, sample.image)
            _outline(ax, sample.label, GT_COLOUR)
            ax.set_title("ground truth", fontsize=8)
    fig.suptitle(sample.id, fontsize=9)
    fig.tight_layout()
    return fig


def _history(client, run_id: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values)


def curves_figure(tracking_uri: str, run_id: str):
    """Training curves of an MLflow run: loss and its terms, validation Dice per level, learning rate."""
    import mlflow

    plt = _pyplot()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    keys = sorted(run.data.metrics)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    loss_ax, dice_ax, lr_ax = axes
    epochs = _history(client, run_id, "val_mean_dice")[0]
    steps, loss = _history(client, run_id, "train_loss")
    if len(steps):
        per_epoch = max(1, int(round(steps.max() / max(len(epochs), 1)))) if len(epochs) else 1
        loss_ax.plot(steps / per_epoch, loss, color="0.75", linewidth=0.6, label="train_loss (iteration)")
    for key in keys:
        if key.startswith("train_loss_"):
            s, v = _history(client, run_id, key)
            loss_ax.plot(s, v, linewidth=1.2, label=key.replace("train_loss_", ""))
    loss_ax.set(title="training loss", xlabel="epoch")
    loss_ax.legend(fontsize=6, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))  # below the curves
    for key in keys:
        if key == "val_mean_dice" or key.startswith("val_dice_level_"):
            s, v = _history(client, run_id, key)
            style = {"linewidth": 2.0, "color": "black"} if key == "val_mean_dice" else {"linewidth": 1.0}
            dice_ax.plot(s, v, label="ensemble" if key == "val_mean_dice" else key[4:], **style)
    if len(epochs):
        s, v = _history(client, run_id, "val_mean_dice")
        best = int(np.argmax(v))
        dice_ax.scatter(
            [s[best]], [v[best]], color="red", zorder=3, label=f"best {v[best]:.3f} (epoch {s[best]})"
        )
    dice_ax.set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    dice_ax.legend(fontsize=7)
    for key in keys:
        if key == "lr" or key.startswith("lr_"):  # MONAI logs lr_group_<i>
            s, v = _history(client, run_id, key)
            lr_ax.plot(s, v, label=key)
    lr_ax.set(title="learning rate", xlabel="iteration")
    fig.suptitle(f"{run.info.run_name} ({run_id[:8]})", fontsize=9)
    fig.tight_layout()
    return fig


def dice_figure(report: dict):
    """Histograms of the per-image Dice in an evaluation report, ensemble and each level."""
    plt = _pyplot()
    rows = report["per_image"]
    names = [k for k in rows[0] if k != "id"] if rows else []
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bins = np.linspace(0, 1, 21)
    for name in names:
        values = [r[name]["dice"] for r in rows]
        style = {"histtype": "stepfilled", "alpha": 0.35} if name == "ensemble" else {"histtype": "step"}
        ax.hist(
            values,
            bins=bins,
            label=f"{name}: mean {np.mean(values):.3f}, median {np.median(values):.3f}",
            **style,
        )
    ax.set(xlabel="Dice", ylabel="images", title=f"per-image Dice, {report.get('images', len(rows))} images")
    ax.yaxis.get_major_locator().set_params(integer=True)  # image counts
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _choose_ids(candidates: list[str], report: dict | None, count: int, seed: int) -> list[str]:
    if report:
        scored = sorted(
            (r["ensemble"]["dice"], r["id"])
            for r in report["per_image"]
            if "ensemble" in r and r["id"] in candidates
        )
        if scored:
            picks = np.unique(np.linspace(0, len(scored) - 1, min(count, len(scored))).round().astype(int))
            return [scored[i][1] for i in picks]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(candidates), size=min(count, len(candidates)), replace=False)
    return [candidates[i] for i in sorted(chosen)]


def _embed(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _html(title: str, sections: list[tuple[str, str]]) -> str:
    body = "\n".join(f"<h2>{html.escape(name)}</h2>\n{content}" for name, content in sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em}"
        "img{max-width:100%;border:1px solid #ddd;margin:4px 0}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#f4f4f4}"
        "figcaption{font-size:90%;color:#444}</style></head><body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def _table(rows: list[list], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{cells}</table>"


def write_report(
    out: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    gaze_csv: str | os.PathLike | None = None,
    preset: str | PseudoMaskConfig = "kvasir",
    ids: list[str] | None = None,
    samples: int = 6,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    bundle_dir: str | os.PathLike | None = None,
    model_uri: str | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    metrics: str | os.PathLike | None = None,
    title: str = "gazemonai report",
) -> dict:
    """Write the pictures and ``report.html`` (see the module docstring) into ``out``.

    Args:
        out: the report folder.
        dataset_dir: data folder with ``images/`` (and ``masks/`` for the ground truth).
        gaze_csv: fixation CSV (without it, no gaze panels).
        preset: pseudo-mask parameters: ``"kvasir"``, ``"prostate"`` or a :class:`PseudoMaskConfig`.
        ids: the images to draw (default: chosen, see ``samples``).
        samples: how many images to draw when ``ids`` is not given.
        seed: the random choice's seed.
        checkpoint: trained weights, drawn as the prediction (with ``bundle_dir``); the settings of a
            recorded training are used.
        bundle_dir: the checkpoint's bundle (configs).
        model_uri: a registered model instead of ``checkpoint`` (``models:/NAME@ALIAS``).
        tracking_uri: MLflow store of the run (curves) and the registry.
        run_id: the MLflow run whose curves are drawn.
        metrics: an evaluation report (``metrics_<split>.json``): the Dice distribution, and the
            samples span its range.
        title: the page title.

    Returns:
        ``{"html": path, "pictures": [paths], "samples": [ids]}``.
    """
    import tempfile

    out = Path(out)
    images_dir = Path(dataset_dir) / "images"
    if not images_dir.is_dir():
        raise MissingInputError(f"{images_dir}: no such folder (the data folder holds images/ and masks/)")
    if isinstance(preset, str) and preset not in PRESETS:
        raise InvalidInputError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    config = PRESETS[preset] if isinstance(preset, str) else preset
    report = None
    if metrics is not None:
        try:
            report = json.loads(Path(metrics).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidInputError(f"{metrics}: cannot read the evaluation report ({e})") from e
        if not isinstance(report, dict) or not isinstance(report.get("per_image"), list):
            raise InvalidInputError(f"{metrics}: not an evaluation report (metrics_<split>.json)")
    fixations = read_fixation_csv(gaze_csv) if gaze_csv is not None else {}
    by_stem = {fx.stem: fx for fx in fixations.values()}
    on_disk = sorted(p.stem for p in images_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if ids is None:
        candidates = [i for i in on_disk if i in by_stem] if by_stem else on_disk
        if not candidates:
            raise InvalidInputError(f"no image of {images_dir} has fixations in {gaze_csv}")
        ids = _choose_ids(candidates, report, samples, seed)
    missing = [i for i in ids if i not in on_disk]
    if missing:
        raise MissingInputError(f"no image for id(s) {', '.join(missing[:5])} in {images_dir}")

    pictures, sections, captions = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        predict = None
        if checkpoint is not None or model_uri is not None:
            from .serve.registry import bundle_predictor

            model = bundle_predictor(Path(tmp), checkpoint, bundle_dir, model_uri, tracking_uri)
            predict = model.predict_image
        for image_id in ids:
            image = read_image(resolve_in_folder(images_dir, image_id))
            sample = Sample(image_id, image, by_stem.get(image_id))
            masks_dir = Path(dataset_dir) / "masks"
            if masks_dir.is_dir():
                try:
                    mask_path = resolve_in_folder(masks_dir, image_id)
                except FileNotFoundError:
                    mask_path = None  # no ground truth for this image: no outline, no Dice
                if mask_path is not None:
                    sample.label = read_mask(mask_path, image.shape[:2])
            if sample.fixations is not None and len(sample.fixations):
                chain = make_pseudo_masks(image, sample.fixations.as_array(), config)
                sample.heatmap, sample.refined, sample.levels = chain.heatmap, chain.refined, chain.levels
            if predict is not None:
                sample.prediction = predict(image)
            if sample.label is not None:
                if sample.levels is not None:
                    for k, level in enumerate(sample.levels):
                        sample.scores[f"level_{k + 1}_pseudo"] = _dice(level, sample.label)
                if sample.prediction is not None:
                    sample.scores["prediction"] = _dice(sample.prediction, sample.label)
            pictures.append(_save(sample_figure(sample), out / "samples" / f"{image_id}.png"))
            captions.append(
                image_id + "".join(f"; {k.replace('_', ' ')} Dice {v:.3f}" for k, v in sample.scores.items())
            )
    figures = "".join(
        f"<figure><img src='{_embed(p)}' alt='{html.escape(c)}'>"
        f"<figcaption>{html.escape(c)}</figcaption></figure>"
        for p, c in zip(pictures, captions)
    )
    if run_id is not None:
        if not tracking_uri:
            raise InvalidInputError("the run's curves need its store: give --tracking-uri")
        curves = _save(curves_figure(tracking_uri, run_id), out / "curves.png")
        pictures.append(curves)
        sections.append(("Training", f"<img src='{_embed(curves)}' alt='training curves'>"))
    if report is not None:
        dice = _save(dice_figure(report), out / "dice.png")
        pictures.append(dice)
        means = [[name, f"{m['dice']:.4f}", f"{m['iou']:.4f}"] for name, m in report.get("mean", {}).items()]
        sections.append(
            (
                f"Evaluation ({report.get('images')} images)",
                _table(means, ["", "mean Dice", "mean IoU"])
                + f"<p>{html.escape(str(report.get('empty_convention', '')))}</p>"
                + f"<img src='{_embed(dice)}' alt='per-image Dice'>",
            )
        )
    legend = (
        "<p>Fixations: circles (area by duration), numbered in viewing order. Outlines: pseudo-mask levels "
        f"(<span style='color:{LEVEL_COLOURS[0]}'>level 1</span>, "
        f"<span style='color:{LEVEL_COLOURS[1]}'>level 2</span>, ...), "
        f"<span style='color:{PRED_COLOUR}'>prediction</span>, "
        f"<span style='color:{GT_COLOUR}'>ground truth</span>. "
        f"Pseudo-masks: {html.escape(json.dumps(config.to_dict()))}.</p>"
    )
    sections.insert(0, ("Samples", legend + figures))
    page = out / "report.html"
    page.write_text(_html(title, sections), encoding="utf-8")
    logger.info("report with %d pictures: %s", len(pictures), page)
    return {"html": str(page), "pictures": [str(p) for p in pictures], "samples": list(ids)}
