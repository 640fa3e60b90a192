"""Does the Gazepoint bridge + fixation detection keep up with a tracker at 60-250 Hz, dropping no sample?

For each rate, a simulated Gazepoint tracker (gazemonai.record.gazepoint.GazepointSimulator, the real
Open Gaze API on loopback) streams fixations, saccades and a blink every 2 s to a GazepointSource; the
main thread cuts the stream into "images" of --image-s seconds and runs detect_fixations on each while
the stream goes on, as the annotation server does on a key press. Reported per rate: records the
simulator sent vs samples received (the difference after a drain, and the tracker's CNT gaps, are
drops), sample-interval anomalies, delivery latency (arrival on the tracker's clock minus the
record's TIME), and the detection time per image. Prints one JSON line last.

Usage: python benchmarks/record_rate.py [--rates 60,120,150,250] [--seconds 6] [--image-s 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gazemonai.record.fixations import detect_fixations  # noqa: E402
from gazemonai.record.gazepoint import GazepointSimulator, fixation_trajectory  # noqa: E402
from gazemonai.record.geometry import ViewGeometry  # noqa: E402
from gazemonai.record.sources import GazepointSource  # noqa: E402

# a Kvasir-sized image (622 x 528) fitted to a 1920 x 1080 screen
GEOMETRY = ViewGeometry(0.0, 1920, 1080, 0, 0, 1.0, (1920 - 622 * 1080 / 528) / 2, 0.0, 1080 / 528, 622, 528)


def run_rate(rate: float, seconds: float, image_s: float) -> dict:
    path = fixation_trajectory(
        points=((0.5, 0.5), (0.42, 0.4), (0.6, 0.62), (0.45, 0.7)),
        fixation_s=0.3,
        saccade_s=0.04,
        blink_every_s=2.0,
        blink_s=0.12,
    )
    samples, arrival = [], []
    lock = threading.Lock()
    with GazepointSimulator(rate_hz=rate, trajectory=path) as sim:

        def on_sample(s):
            now = sim.now()
            with lock:
                samples.append(s)
                arrival.append(now)

        src = GazepointSource(port=sim.port)
        src.start(on_sample)
        if not src.wait_connected(5):
            raise SystemExit(f"could not connect to the simulator at {rate} Hz")
        detect_s, n_fix, n_per_image = [], [], []
        cut = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(image_s)
            with lock:
                chunk = samples[cut:]
                cut = len(samples)
            t0 = time.perf_counter()
            fx = detect_fixations(chunk, GEOMETRY)
            detect_s.append(time.perf_counter() - t0)
            n_fix.append(len(fx))
            n_per_image.append(len(chunk))
        sim.drop_clients()  # stop sending: the counts below are final once the socket drains
        time.sleep(0.3)
        sent = sim.sent
        src.stop()
    with lock:
        t = np.array([s.t for s in samples])
        lat = (np.array(arrival) - t) * 1000.0
    dt = np.diff(t)
    return {
        "sent": int(sent),
        "received": len(samples),
        "dropped": int(sent - len(samples)) + int(src.gaps),
        "cnt_gaps": int(src.gaps),
        "interval_anomalies": int(np.sum(np.abs(dt - 1.0 / rate) > 0.25 / rate)),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 3),
        "latency_ms_max": round(float(lat.max()), 3),
        "images": len(detect_s),
        "samples_per_image": int(np.median(n_per_image)),
        "fixations_per_image": float(np.mean(n_fix)),
        "detect_ms_per_image_mean": round(1000 * float(np.mean(detect_s)), 2),
        "detect_ms_per_image_max": round(1000 * float(np.max(detect_s)), 2),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="60,120,150,250", help="sample rates in Hz, comma-separated")
    ap.add_argument("--seconds", type=float, default=6.0, help="streaming time per rate")
    ap.add_argument("--image-s", type=float, default=2.0, help="seconds per image (one detection each)")
    args = ap.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]
    detect_fixations([], GEOMETRY)  # import pymovements before timing
    results = {}
    for rate in rates:
        results[f"{rate:g}"] = r = run_rate(rate, args.seconds, args.image_s)
        print(f"{rate:g} Hz: {r}", file=sys.stderr)
    out = {
        "rates_hz": [float(r) for r in rates],
        "dropped_total": sum(r["dropped"] for r in results.values()),
        "interval_anomalies_total": sum(r["interval_anomalies"] for r in results.values()),
        "per_rate": results,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
