"""Simulated gaze: masks -> plausible fixation sequences, for data sets recorded without an eye tracker.

The model follows what the real GazeMedSeg recordings (Kvasir-SEG, EyeLink 1000) show:

1. a short *search* phase: the first fixation lands near the screen centre, where the trial starts;
2. *inspection*: fixations on the object, ordered roughly from its centre to its boundary, sampled
   with a mild preference for the interior (real fixations sit at a median normalised depth of about
   0.37 inside the mask, against 0.29 for uniform sampling);
3. eye-tracker noise: isotropic Gaussian jitter of about 1 % of the image diagonal (EyeLink's ~0.5°
   accuracy at a usual viewing distance), so some fixations land just outside the boundary;
4. *off-target* fixations: a few glances elsewhere, mostly close to the object;
5. durations drawn from the real log-normal (median ~305 ms), at least 50 ms (the authors' filter),
   and start times separated by saccades of 20-60 ms.

Every random draw comes from a generator seeded by ``(seed, image name)``, so a sequence depends only
on those and the mask, not on the order images are processed in.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import InvalidInputError, MissingInputError
from ..prep.io import IMAGE_EXTENSIONS, read_mask, resolve_in_folder, validate_image_name
from .fixations import ImageFixations, write_fixation_csv

__all__ = ["GazeSimulator", "simulate_fixations", "simulate_gaze_folder"]


@dataclass
class GazeSimulator:
    """Draws fixation sequences from binary masks.

    Args:
        seed: base seed; each image's generator is seeded by ``(seed, crc32(image name))``.
        mean_fixations: median number of fixations per image (the real Kvasir data: 25).
        fixations_spread: sigma of the log-normal number of fixations.
        min_fixations: fewest fixations per image.
        max_fixations: most fixations per image.
        search_fixations: fixations of the search phase before the object is found.
        search_spread: standard deviation (fraction of the image size) of search fixations around the
            image centre.
        interior_bias: exponent on the normalised depth when sampling object fixations
            (0 = uniform over the mask, larger = more central).
        order_jitter: randomness of the centre-to-boundary order (0 = strictly by depth).
        noise: eye-tracker noise, standard deviation as a fraction of the image diagonal.
        off_target: probability that an inspection fixation is a glance away from the object.
        off_target_near: probability that such a glance lands close to the object (otherwise anywhere).
        log_duration_mean: mean of log(duration in ms).
        log_duration_sigma: standard deviation of log(duration in ms).
        min_duration: shortest fixation kept, in ms.
    """

    seed: int = 0
    mean_fixations: float = 25.0
    fixations_spread: float = 0.4
    min_fixations: int = 5
    max_fixations: int = 99
    search_fixations: int = 1
    search_spread: float = 0.12
    interior_bias: float = 0.35
    order_jitter: float = 0.25
    noise: float = 0.011
    off_target: float = 0.05
    off_target_near: float = 0.7
    log_duration_mean: float = 5.716
    log_duration_sigma: float = 0.4525
    min_duration: float = 50.0

    def rng_for(self, image: str) -> np.random.Generator:
        return np.random.default_rng([int(self.seed) & 0xFFFFFFFF, zlib.crc32(image.encode("utf-8"))])

    def __call__(self, mask: np.ndarray, image: str, n_fixations: int | None = None) -> ImageFixations:
        """Simulate one viewing of an image.

        Args:
            mask: (H, W) array, foreground > 0 (a (1, H, W) or (H, W, 1) array is squeezed).
            image: the ``IMAGE`` name to record (e.g. ``case_01.png``); also seeds the generator.
            n_fixations: fixed number of fixations instead of a random one.

        Returns:
            the fixations, normalised to [0, 1], in viewing order.
        """
        validate_image_name(image)
        m = np.asarray(mask)
        if m.ndim == 3 and 1 in (m.shape[0], m.shape[-1]):
            m = m.reshape(m.shape[1:] if m.shape[0] == 1 else m.shape[:-1])
        if m.ndim != 2 or m.size == 0:
            raise InvalidInputError(
                f"{image}: mask must be a non-empty 2-D array, got shape {np.asarray(mask).shape}"
            )
        m = m > 0
        h, w = m.shape
        rng = self.rng_for(image)
        n = n_fixations
        if n is None:
            n = int(
                round(np.exp(np.log(self.mean_fixations) + self.fixations_spread * rng.standard_normal()))
            )
        n = int(np.clip(n, self.min_fixations, self.max_fixations))
        diag = float(np.hypot(h, w))
        pts: list[tuple[float, float]] = []  # (row, col) in pixels, continuous

        n_search = min(self.search_fixations, n)
        for _ in range(n_search):
            pts.append(
                (
                    h * (0.5 + self.search_spread * rng.standard_normal()),
                    w * (0.5 + self.search_spread * rng.standard_normal()),
                )
            )
        n_rest = n - n_search
        if m.any():
            depth = ndimage.distance_transform_edt(m)
            rows, cols = np.nonzero(m)
            d = depth[rows, cols] / depth.max()
            p = d**self.interior_bias
            p /= p.sum()
            off = rng.random(n_rest) < self.off_target
            n_on = int((~off).sum())
            pick = rng.choice(rows.size, size=n_on, p=p, replace=True)
            # centre to boundary, loosely: sort by depth plus jitter
            key = d[pick] + self.order_jitter * rng.standard_normal(n_on)
            pick = pick[np.argsort(-key)]
            on_pts = [(rows[k] + rng.random(), cols[k] + rng.random()) for k in pick]
            outside = np.nonzero(~m)
            near_zone = None
            if outside[0].size:
                dist_out = ndimage.distance_transform_edt(~m)
                near = dist_out[outside] <= 0.1 * diag
                near_zone = (outside[0][near], outside[1][near])
            it = iter(on_pts)
            for is_off in off:
                if not is_off:
                    pts.append(next(it))
                    continue
                if near_zone is not None and near_zone[0].size and rng.random() < self.off_target_near:
                    k = rng.integers(near_zone[0].size)
                    pts.append((near_zone[0][k] + rng.random(), near_zone[1][k] + rng.random()))
                else:
                    pts.append((h * rng.random(), w * rng.random()))
        else:  # nothing to look at: the reader keeps searching
            pts.extend((h * rng.random(), w * rng.random()) for _ in range(n_rest))

        rc = np.asarray(pts, dtype=np.float64)
        rc[n_search:] += self.noise * diag * rng.standard_normal((n_rest, 2))
        # like the real recordings, fixations off the image are not kept: clamp them onto its border
        ys = np.clip(rc[:, 0] / h, 0.0, 1.0)
        xs = np.clip(rc[:, 1] / w, 0.0, 1.0)
        dur = np.exp(self.log_duration_mean + self.log_duration_sigma * rng.standard_normal(n))
        dur = np.maximum(np.rint(dur), self.min_duration)
        saccades = rng.integers(20, 61, size=n)
        start = np.concatenate([[7.0], np.cumsum(dur[:-1] + saccades[:-1]) + 7.0])
        pupil = rng.integers(1200, 3200, size=n).astype(np.float64)
        return ImageFixations(
            image=image,
            xy=np.stack([xs, ys], axis=1),
            duration=dur.astype(np.float64),
            height=h,
            width=w,
            index=np.arange(1, n + 1),
            start=start,
            pupil=pupil,
            rows=np.zeros(n, dtype=np.int64),
        )


def simulate_fixations(mask: np.ndarray, image: str, seed: int = 0, **kwargs) -> ImageFixations:
    """Functional form of :class:`GazeSimulator`: ``GazeSimulator(seed=seed, **kwargs)(mask, image)``."""
    return GazeSimulator(seed=seed, **kwargs)(mask, image)


def simulate_gaze_folder(
    masks_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    simulator: GazeSimulator | None = None,
    ids: Iterable[str] | None = None,
    image_suffix: str | None = None,
) -> dict:
    """Simulate gaze for every mask in a folder and write one CSV in the GazeMedSeg schema.

    Args:
        masks_dir: folder of mask images (0/255 or 0/1).
        out_csv: CSV to write.
        simulator: the gaze model (default :class:`GazeSimulator` with seed 0).
        ids: only these ids (file stems); default every image file of the folder, sorted.
        image_suffix: extension recorded in ``IMAGE`` (default: each mask's own file name).

    Returns:
        counts: images written, fixations, and unreadable masks (which raise: nothing is dropped).
    """
    simulator = simulator or GazeSimulator()
    folder = Path(masks_dir)
    if not folder.is_dir():
        raise MissingInputError(f"mask folder not found: {folder}")
    if ids is None:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    else:
        files = [resolve_in_folder(folder, i.strip()) for i in ids if i.strip()]
    if not files:
        raise InvalidInputError(f"no mask images in {folder}")
    tables = []
    for p in files:
        name = p.name if image_suffix is None else p.stem + image_suffix
        tables.append(simulator(read_mask(p), name))
    write_fixation_csv(out_csv, tables)
    return {"images": len(tables), "fixations": int(sum(len(t) for t in tables)), "csv": str(out_csv)}
