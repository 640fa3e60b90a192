"""The README's demo, end to end on data it makes itself:

1. a small synthetic polyp dataset (Kvasir-SEG layout) and simulated gaze for it;
2. pseudo-masks from the gaze (``gazemonai pseudo-masks``), scored against the true masks;
   annotate: a recorded gaze stream (raw tracker samples + the page's events) replayed through
   ``gazemonai annotate``'s recording path (the replay source, no browser) into a fixation CSV;
3. the ``kvasir_gaze`` bundle: a small multi-level model trained from gaze, evaluated on the test
   split, and run for inference.

    python -m gazemonai.demo --out demo_output
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .gaze.dataset import run_pseudo_masks
from .gaze.fixations import ImageFixations
from .gaze.simulate import GazeSimulator, simulate_gaze_folder
from .prep.synthetic import make_synthetic_dataset

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "kvasir_gaze" / "configs"


def run_bundle(out: Path, data: Path, gaze_csv: Path, epochs: int) -> dict:
    from monai.bundle import run

    from .train.settings import config_path

    out, data, gaze_csv = (
        Path(config_path(n, p)) for n, p in (("--out", out), ("data", data), ("gaze CSV", gaze_csv))
    )
    common = {
        "bundle_root": str(out / "bundle"),
        "dataset_dir": str(data),
        "gaze_csv": str(gaze_csv),
        "image_size": [64, 64],
        "batch_size": 4,
        "epochs": epochs,
        "val_fraction": 0.2,
        "num_workers": 0,
        "logging_file": str(BUNDLE / "logging.conf"),
    }
    run(config_file=str(BUNDLE / "train.json"), **common)
    run(config_file=[str(BUNDLE / "train.json"), str(BUNDLE / "evaluate.json")], eval_split="test", **common)
    run(
        config_file=str(BUNDLE / "inference.json"),
        bundle_root=common["bundle_root"],
        dataset_dir=str(data / "images"),
        output_dir=str(out / "predictions"),
        image_size=[64, 64],
        logging_file=common["logging_file"],
    )
    return json.loads((out / "bundle" / "outputs" / "metrics_test.json").read_text())


def scripted_recording(data: Path, out: Path, n_images: int = 4, seed: int = 0, rate_hz: float = 60.0):
    """What an annotation session leaves behind, made up: raw samples and page events for the replay source.

    A simulated reader (:class:`~gazemonai.gaze.simulate.GazeSimulator`) looks at each of the first
    ``n_images`` images, drawn fitted on a 1280x800 screen: each fixation becomes ``rate_hz`` samples
    with tracker noise at its screen position, a blink (invalid samples) interrupts each image.

    Returns:
        ``(raw_csv, events_jsonl)``, the files ``gazemonai annotate --source replay`` replays.
    """
    from dataclasses import asdict

    import numpy as np

    from .prep.io import read_mask
    from .record.geometry import ViewGeometry, image_to_screen
    from .record.samples import GazeSample, write_raw_samples

    sim, rng = GazeSimulator(seed=seed), np.random.default_rng(seed)
    samples, events, t, dt = [], [], 0.0, 1.0 / rate_hz
    for mask_path in sorted((data / "masks").glob("*.png"))[:n_images]:
        mask = read_mask(mask_path)
        h, w = mask.shape
        scale = 0.9 * min(1280 / w, 800 / h)
        g = ViewGeometry(t, 1280, 800, 0, 0, 1.0, (1280 - w * scale) / 2, (800 - h * scale) / 2, scale, w, h)
        fixations: ImageFixations = sim(mask, mask_path.name)
        events.append({"event": "begin", "image": mask_path.name, "t": t, "geometry": asdict(g)})
        for k, ((x, y), ms) in enumerate(zip(fixations.xy, fixations.duration)):
            sx, sy = image_to_screen(x * w, y * h, g)
            for _ in range(max(4, int(ms / 1000 * rate_hz))):
                t += dt
                noise = rng.normal(0, 0.0003, 2)
                samples.append(GazeSample(t, float(sx + noise[0]), float(sy + noise[1]), True))
            if k == len(fixations) // 2:
                for _ in range(6):  # a blink: the tracker flags its samples invalid
                    t += dt
                    samples.append(GazeSample(t, float("nan"), float("nan"), False))
        t += 0.1
        events.append({"event": "finish", "image": mask_path.name, "t": t})
        t += 0.5
    out.mkdir(parents=True, exist_ok=True)
    raw, log = out / "recorded_samples.csv", out / "recorded_events.jsonl"
    write_raw_samples(raw, samples)
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    return raw, log


def annotate_step(data: Path, out: Path, seed: int = 0) -> dict:
    """A recorded gaze stream replayed through ``gazemonai annotate``'s recording path (no browser)."""
    from .record.fixations import require_pymovements
    from .record.server import replay_recording

    require_pymovements()
    raw, events = scripted_recording(data, out / "annotate", seed=seed)
    rec = replay_recording(
        data / "images", out / "annotate" / "gaze.csv", raw, events, annotator="demo", recording="demo"
    )
    print(
        f"[annotate] a recorded gaze stream replayed through `gazemonai annotate --source replay`: "
        f"{rec['fixations']} fixations on {rec['images']} images -> {out / 'annotate' / 'gaze.csv'} "
        f"({rec['seconds_mean']:.1f} s per image)"
    )
    return {k: rec[k] for k in ("images", "fixations", "seconds_mean", "seconds_total")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_output", help="folder for everything the demo writes")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-train", action="store_true", help="stop after the pseudo-masks")
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = make_synthetic_dataset(
        out / "data", n_images=args.images, seed=args.seed, n_test=max(2, args.images // 8)
    )
    gaze_csv = out / "data" / "gaze.csv"
    sim = simulate_gaze_folder(data / "masks", gaze_csv, GazeSimulator(seed=args.seed))
    print(
        f"[1/3] synthetic dataset: {sim['images']} images in {data}; "
        f"simulated gaze: {sim['fixations']} fixations -> {gaze_csv}"
    )
    summary = run_pseudo_masks(data, gaze_csv, out / "pseudo_masks", progress=False)
    print(f"[2/3] pseudo-masks in {out / 'pseudo_masks'} (heatmap, refined, level_1, level_2, manifest.json)")
    for name, v in summary["dice_vs_gt"].items():
        print(f"      {name} (threshold {v['threshold']}): mean Dice vs GT {v['mean_dice']:.3f}")
    result = {"pseudo_masks": summary}
    from .record.fixations import DetectorUnavailableError

    try:
        result["annotate"] = annotate_step(data, out, seed=args.seed)
    except DetectorUnavailableError as e:  # pymovements is the optional extra gazemonai[record]
        print(f"[annotate] skipped: {e}")
    if not args.no_train:
        logging.getLogger("ignite").setLevel(logging.WARNING)
        report = run_bundle(out, data, gaze_csv, args.epochs)
        print(f"[3/3] kvasir_gaze bundle trained from gaze for {args.epochs} epochs in {out / 'bundle'}")
        for name, v in report["mean"].items():
            print(f"      test {name}: Dice {v['dice']:.3f}  IoU {v['iou']:.3f}")
        print(f"      metrics: {out / 'bundle' / 'outputs' / 'metrics_test.json'}")
        print(f"      predicted masks: {out / 'predictions'}")
        db = (out / "bundle" / "outputs" / "mlruns.db").resolve()
        print(f"      MLflow: mlflow ui --backend-store-uri sqlite:///{db}")
        result["test"] = report["mean"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
