"""Everything issue #24 measures on a GPU, in one command: set-up, steps, profile, the bundle (one JSON line).

On a bare CUDA machine (torch preinstalled, no network) with the folder that ``gpu_prepare.sh`` makes
(``.gpu_carry/``: the wheels of ``../shared/gpu/fetch-deps.sh`` + Pillow and tqdm, and a small Kvasir
subset with its fixations), carried with the working tree::

    python3 benchmarks/gpu_check.py --device cuda          # results under $OUT (or ./gpu_check_out)

Stages, each in its own process, time-boxed, and reported in the JSON whether it worked or not (one
failing stage never stops the others):

1. ``setup``: installs the carried wheels (``setup-here.sh``: into /tmp/site, pydensecrf2 built from
   its shipped C++) unless MONAI, ignite and pydensecrf already import; the children get its
   ``PYTHONPATH``.
2. ``step_bfloat16`` / ``step_float32``: ``train_step.py --ref gazesup`` at paper widths
   (64..1024, 128), 224², batch 8, 2 levels: ours (the bundles' GPU profile: joint step, fused SGD,
   autocast) against GazeSup's own loop (``gazesup_step.py``); bf16 also profiles one step of each
   (``torch.profiler``, top ops by self device time: ``profiles/profile_*.txt``).
3. ``bundle``: ``python -m monai.bundle run`` with ``train.json`` + ``paper_profile.json`` (+ the
   ``gpu.json`` that the paper profile chooses on CUDA) on the carried Kvasir subset for
   ``--iterations`` iterations; an :class:`IterationClock` handler times the iterations after the
   first epoch; reported against the bare bf16 step (``bundle_over_step``; goal <= 1.25).
4. ``step_compile`` / ``step_channels_last``: ours with ``torch.compile`` / channels-last (bf16),
   when time is left.

``--tiny`` runs the same on CPU with tiny widths and images (what the test runs, so the script
never rots). The JSON (``gpu_check.json``), the profiler tables and each stage's log tail are
written under ``--out`` (default ``$OUT``, else ``./gpu_check_out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUNDLE = ROOT / "bundles" / "kvasir_gaze" / "configs"
PAPER = dict(features="64,128,256,512,1024,128", size=224, batch=8, levels=2)
SUMMARY_KEYS = (
    "ms_per_step", "ref_ms_per_step", "speedup", "peak_cuda_mb", "ref_peak_cuda_mb", "cuda_ratio",
    "peak_rss_mb", "ref_peak_rss_mb",
)  # fmt: skip
TINY = dict(features="4,4,8,8,16,4", size=32, batch=2, levels=2)


class IterationClock:
    """Ignite handler: wall time per training iteration after ``warmup`` iterations, written as JSON.

    CUDA is synchronised at the first timed iteration and at the last, so the mean covers all the
    device work in between, data loading and every handler included (checkpoints, MLflow, validation
    rounds that fall inside). The median of the per-iteration intervals shows the bare step.

    Args:
        path: the JSON file written when the run completes.
        warmup: iterations left out at the start (the first epoch: cuDNN autotuning, worker start-up).
    """

    def __init__(self, path: str, warmup: int = 10) -> None:
        self.path, self.warmup = path, warmup
        self.marks: list[float] = []
        self.t_start = None

    def _sync(self):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write, True)  # partial, unsynchronised
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _started(self, engine) -> None:
        self.t_start = time.perf_counter()

    def _iteration(self, engine) -> None:
        last = engine.state.iteration == engine.state.epoch_length * engine.state.max_epochs
        if engine.state.iteration == self.warmup or last:
            self._sync()
        self.marks.append(time.perf_counter())

    def _write(self, engine, partial: bool = False) -> None:
        import statistics

        timed = self.marks[self.warmup - 1 :] if len(self.marks) > self.warmup else self.marks
        n = len(timed) - 1
        deltas = [b - a for a, b in zip(timed, timed[1:])]
        res = {
            "iterations": len(self.marks),
            "epochs": engine.state.epoch,
            "iterations_per_epoch": engine.state.epoch_length,
            "timed_iterations": n,
            "ms_per_iteration": round((timed[-1] - timed[0]) / n * 1000, 1) if n > 0 else None,
            "median_ms_per_iteration": round(statistics.median(deltas) * 1000, 1) if deltas else None,
            "first_iteration_s": round(self.marks[0] - self.t_start, 2) if self.marks else None,
        }
        if partial:  # what a run stopped by its time box leaves: the figures up to the last epoch
            res["partial"] = True
        Path(self.path).write_text(json.dumps(res))


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


class Stages:
    """Runs stages in a time budget; each returns a dict or raises; the outcome is kept per stage."""

    def __init__(self, budget_s: float, out: Path):
        self.t0 = time.perf_counter()
        self.budget = budget_s
        self.out = out
        self.report: dict[str, dict] = {}

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def run(self, name: str, fn, need_s: float = 0.0, skip: bool = False) -> dict | None:
        if skip:
            self.report[name] = {"ok": False, "skipped": "--skip"}
            return None
        if self.left() < need_s:
            self.report[name] = {
                "ok": False,
                "skipped": f"out of time ({self.left():.0f} s left, needs {need_s:.0f})",
            }
            return None
        t = time.perf_counter()
        try:
            res = fn()
            self.report[name] = {"ok": True, "s": round(time.perf_counter() - t, 1), **(res or {})}
            return res
        except Exception as e:  # noqa: BLE001 - a stage's failure is reported, the next stage runs
            msg = str(e).strip().splitlines()
            self.report[name] = {
                "ok": False,
                "s": round(time.perf_counter() - t, 1),
                "error": f"{type(e).__name__}: {msg[-1] if msg else ''}"[:500],
            }
            return None


def _run(cmd: list[str], env: dict, timeout: float, log: Path) -> subprocess.CompletedProcess:
    """Run ``cmd``; its output goes to ``log``; a non-zero exit or a timeout raises with the log's tail."""
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        log.write_text(out + "\n" + err)
        raise TimeoutError(f"timed out after {timeout:.0f} s (log: {log.name})") from None
    log.write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        last = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        raise RuntimeError(f"exit {proc.returncode} (log: {log.name}): {last[-1] if last else ''}")
    return proc


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError("no JSON line in the output")


def setup(env: dict, carry: Path, logs: Path) -> dict:
    """Install the carried wheels unless the libraries import already; returns what was done."""
    probe = [sys.executable, "-c", "import monai, ignite, pydensecrf.densecrf, PIL, fire"]
    if subprocess.run(probe, env=env, capture_output=True).returncode == 0:
        return {"installed": False, "note": "monai, ignite, pydensecrf, PIL and fire import already"}
    wheels = carry / "wheels"
    if not (wheels / "setup-here.sh").is_file():
        raise FileNotFoundError(f"{wheels}/setup-here.sh not found: run benchmarks/gpu_prepare.sh here first")
    proc = _run(["bash", str(wheels / "setup-here.sh"), str(wheels)], env, 150, logs / "setup.log")
    m = re.search(r"export PYTHONPATH=(\S+?)\$\{PYTHONPATH", proc.stdout)
    if not m:
        raise RuntimeError(f"setup-here.sh printed no PYTHONPATH: {_tail(proc.stdout, 300)}")
    extra = m.group(1).rstrip(":")
    env["PYTHONPATH"] = extra + os.pathsep + env["PYTHONPATH"]
    if subprocess.run(probe, env=env, capture_output=True).returncode != 0:
        err = subprocess.run(probe, env=env, capture_output=True, text=True).stderr.strip().splitlines()
        raise RuntimeError(f"still missing after set-up: {err[-1] if err else '?'}")
    return {"installed": True, "pythonpath": extra}


def environment(env: dict) -> dict:
    code = (
        "import json, torch, platform; c = torch.cuda.is_available();"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        "'python': platform.python_version(),"
        "'gpu': torch.cuda.get_device_name(0) if c else None, 'cpus': __import__('os').cpu_count(),"
        "'bf16': torch.cuda.is_bf16_supported() if c else None}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return _last_json(proc.stdout)


def train_step(env, args, shape, dtype, logs, timeout, extra=(), profile_dir=None, impl="both") -> dict:
    cmd = [sys.executable, str(HERE / "train_step.py"), "--device", args.device, "--dtype", dtype]
    cmd += ["--ref", "gazesup", "--step", "joint", "--impl", impl, "--features", shape["features"]]
    cmd += ["--size", str(shape["size"]), "--batch", str(shape["batch"]), "--levels", str(shape["levels"])]
    cmd += ["--steps", str(args.steps), "--threads", str(args.threads), *extra]
    if profile_dir:
        cmd += ["--profile-dir", str(profile_dir)]
    name = "_".join(["step", dtype, *[e.strip("-").replace("-", "_") for e in extra]])  # its log file
    return _last_json(_run(cmd, env, timeout, logs / f"{name}.log").stdout)


def bundle_overrides(path: Path, clock_json: Path, warmup: int, env: dict) -> dict:
    """The check's own config on top of the bundle's: the clock; no MLflow/progress bar where absent."""
    cfg = {
        "gpu_check_clock": {
            "_target_": "gpu_check.IterationClock",
            "path": str(clock_json),
            "warmup": warmup,
        },
        "train#trainer#train_handlers": "$@train#handlers + @train#log_handlers + [@gpu_check_clock]",
        "val_interval": "@epochs",  # one validation round, at the end (checks that path; not timed)
        "settings_check#val_interval": None,
    }
    probe = (
        "import importlib.util as u, sys; sys.exit(0 if u.find_spec('mlflow') and u.find_spec('tqdm') else 1)"
    )
    have = subprocess.run([sys.executable, "-c", probe], env=env).returncode == 0
    if not have:  # a bare machine: the training itself, without the tracking it cannot import
        stats = {"_target_": "StatsHandler", "tag_name": "train_loss", "iteration_log": False,
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"}  # fmt: skip
        cfg["train#log_handlers"] = [stats]
        cfg["validate#handlers"] = [
            {"_target_": "StatsHandler", "iteration_log": False},
            "@validate#best_model",
        ]
    path.write_text(json.dumps(cfg, indent=1))
    return {"mlflow": have}


def bundle_run(env, args, shape, data: Path, work: Path, logs: Path, timeout: float) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    clock = work / "clock.json"
    over = work / "gpu_check_overrides.json"
    info = bundle_overrides(over, clock, args.bundle_warmup, env)
    configs = [BUNDLE / "train.json", BUNDLE / "paper_profile.json"]
    if (BUNDLE / "gpu.json").is_file() and args.device.startswith("cuda"):
        configs.append(BUNDLE / "gpu.json")
    configs.append(over)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        json.dumps([str(c) for c in configs]),
    ]
    cmd += [
        "--bundle_root",
        str(work / "bundle"),
        "--dataset_dir",
        str(data),
        "--gaze_csv",
        str(data / "gaze.csv"),
    ]
    cmd += ["--iterations", str(args.iterations)]  # the bundle picks its device: CUDA when there is one
    if args.tiny:
        cmd += ["--features", "[4,4,8,8,16,4]", "--image_size", "[32,32]", "--batch_size", "2"]
        cmd += ["--num_workers", "0", "--cache_workers", "1", "--val_fraction", "0.34"]
    child = dict(env, PYTHONPATH=str(HERE) + os.pathsep + env["PYTHONPATH"])
    try:
        _run(cmd, child, timeout, logs / "bundle.log")
    except TimeoutError:
        if not clock.is_file():
            raise
        res = json.loads(clock.read_text())  # the epochs it finished: figures marked partial
        if not res.get("timed_iterations"):
            raise
        res["timed_out"] = True
        return {**info, **res, "configs": [c.name for c in configs[:-1]]}
    res = json.loads(clock.read_text())
    res["configs"] = [c.name for c in configs[:-1]]
    return {**info, **res}


def tiny_data(root: Path) -> Path:
    """A few generated images with simulated gaze (what ``--tiny`` trains on when no data is given)."""
    from gazemonai.gaze.simulate import GazeSimulator, simulate_gaze_folder
    from gazemonai.prep.synthetic import make_synthetic_dataset

    data = make_synthetic_dataset(root / "data", n_images=6, size=(48, 64))
    simulate_gaze_folder(data / "masks", data / "gaze.csv", GazeSimulator(seed=1))
    return data


def summarise(report: dict) -> dict:
    s: dict = {}
    for dtype in ("bfloat16", "float32"):
        r = report.get(f"step_{dtype}", {})
        if r.get("ok"):
            s[dtype] = {k: r.get(k) for k in SUMMARY_KEYS}
    for name, r in report.items():  # the measured options of ours: step_compile, step_propagation_...
        if name.startswith("step_") and name[5:] not in s and name[5:] not in ("bfloat16", "float32"):
            if r.get("ok"):
                s[name[5:]] = {"ms_per_step": r.get("ms_per_step"), "peak_cuda_mb": r.get("peak_cuda_mb")}
    b, bf = report.get("bundle", {}), s.get("bfloat16", {})
    if b.get("ok") and b.get("ms_per_iteration") and bf.get("ms_per_step"):
        s["bundle_ms_per_iteration"] = b["ms_per_iteration"]
        s["bundle_over_step"] = round(b["ms_per_iteration"] / bf["ms_per_step"], 2)
    goals = {}
    if bf:
        goals["speedup_ge_4"] = bool(bf["speedup"] and bf["speedup"] >= 4)
        goals["ms_le_60"] = bool(bf["ms_per_step"] and bf["ms_per_step"] <= 60)
        if bf.get("cuda_ratio") is not None:
            goals["memory_le_half"] = bf["cuda_ratio"] <= 0.5
    if "bundle_over_step" in s:
        goals["bundle_le_1_25"] = s["bundle_over_step"] <= 1.25
    s["goals"] = goals
    return s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument(
        "--tiny", action="store_true", help="tiny widths and images, generated data (the CPU test)"
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="results folder ($OUT)")
    ap.add_argument("--carry", default=str(ROOT / ".gpu_carry"), help="the folder gpu_prepare.sh made")
    ap.add_argument("--data", default=None, help="Kvasir-style folder with gaze.csv (default: CARRY/kvasir)")
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds for all stages together (480; tiny 3600)"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per implementation (20; tiny 2)")
    ap.add_argument("--iterations", type=int, default=None, help="bundle iterations (300; tiny 6)")
    ap.add_argument("--bundle-warmup", type=int, default=None, help="untimed bundle iterations (first epoch)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the steps (16; tiny 1)")
    ap.add_argument(
        "--skip",
        default="",
        help="stages not to run, comma-separated: setup, step, bundle, compile, channels_last",
    )
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.budget = (3600.0 if tiny else 480.0) if args.budget is None else args.budget
    args.steps = args.steps or (2 if tiny else 20)
    args.iterations = args.iterations or (6 if tiny else 300)
    args.threads = args.threads or (1 if tiny else min(16, os.cpu_count() or 1))
    shape = TINY if tiny else PAPER
    out = Path(args.out).resolve()
    logs, profiles = out / "logs", out / "profiles"
    for d in (logs, profiles):
        d.mkdir(parents=True, exist_ok=True)
    carry = Path(args.carry).resolve()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    stages = Stages(args.budget, out)
    # each stage gets at most its room, and leaves the later ones a minute
    room = {"step_bfloat16": 150, "step_float32": 120, "bundle": 200}
    if tiny:  # CPU, maybe a busy one: the boxes are for the GPU's 8 minutes, not for this
        room = dict.fromkeys(room, args.budget)
    stages.run("setup", lambda: setup(env, carry, logs), skip="setup" in skip)
    envinfo = stages.run("environment", lambda: environment(env)) or {}
    for dtype in ("bfloat16", "float32"):
        name = f"step_{dtype}"
        stages.run(
            name,
            lambda dtype=dtype, name=name: train_step(
                env,
                args,
                shape,
                dtype,
                logs,
                min(room[name], stages.left() - 60),
                profile_dir=profiles if dtype == "bfloat16" else None,
            ),
            need_s=30,
            skip="step" in skip,
        )

    def bundle():
        if args.data:
            data = Path(args.data).resolve()
        elif tiny and not (carry / "kvasir").is_dir():
            data = tiny_data(out / "work")
        else:
            data = carry / "kvasir"
        if not (data / "gaze.csv").is_file():
            raise FileNotFoundError(f"{data}/gaze.csv not found: run benchmarks/gpu_prepare.sh here first")
        if args.bundle_warmup is None:
            args.bundle_warmup = 2 if tiny else 20
        timeout = min(room["bundle"], stages.left() - 5)
        return bundle_run(env, args, shape, data, out / "work", logs, timeout)

    stages.run("bundle", bundle, need_s=40, skip="bundle" in skip)
    # measured options of ours, bf16: the propagation's implementations where train_step.py has the
    # switch (#24 item 2: the fused kernel or torch.compile, whichever measures faster; GPU only),
    # then channels-last and torch.compile (the slowest to start: last)
    options = {"channels_last": ["--channels-last"], "compile": ["--compile"]}
    if (
        not tiny
        and "--propagation"
        in subprocess.run(
            [sys.executable, str(HERE / "train_step.py"), "--help"], env=env, capture_output=True, text=True
        ).stdout
    ):
        options = {f"propagation_{k}": ["--propagation", k] for k in ("shifted", "compiled")} | options
    for opt, extra in options.items():
        stages.run(
            f"step_{opt}",
            lambda opt=opt, extra=extra: train_step(
                env, args, shape, "bfloat16", logs, stages.left() - 5, extra=tuple(extra), impl="ours"
            ),
            need_s=60 if not tiny else 5,
            skip=opt in skip or opt.split("_")[0] in skip,
        )
    result = {
        "check": "gpu_check",
        "tiny": tiny,
        "device": args.device,
        "gpu": envinfo.get("gpu"),
        "torch": envinfo.get("torch"),
        "cuda": envinfo.get("cuda"),
        "python": envinfo.get("python") or platform.python_version(),
        "shape": {**shape, "features": [int(f) for f in shape["features"].split(",")]},
        "summary": summarise(stages.report),
        "stages": stages.report,
        "total_s": round(time.perf_counter() - stages.t0, 1),
    }
    line = json.dumps(result)
    (out / "gpu_check.json").write_text(line + "\n")
    shutil.rmtree(
        out / "work" / "bundle" / "models", ignore_errors=True
    )  # checkpoints: not worth carrying back
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
