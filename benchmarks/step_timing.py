"""What the training-step benchmarks share: their options, a MONAI joint step, alternating timing.

Not a benchmark itself: ``hybrid_step.py`` and ``prompt_step.py`` import it (run them from anywhere;
their folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse
import time


def step_parser(doc: str) -> argparse.ArgumentParser:
    """The options every step benchmark takes (CPU profile defaults)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--features", default="16,32,64,128,256,16")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    return ap


def joint_step(net, loss, prepare_batch, batchdata: dict, dtype: str):
    """``(step, engine)``: one MONAI ``SupervisedTrainer`` joint iteration on ``batchdata`` per call."""
    import torch
    from monai.engines import SupervisedTrainer

    from gazemonai.train.engine import AutocastInferer

    engine = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[batchdata],
        network=net,
        optimizer=torch.optim.AdamW(net.parameters(), 2e-3),
        loss_function=loss,
        inferer=AutocastInferer(dtype),
        prepare_batch=prepare_batch,
        decollate=False,
    )
    engine.state.iteration = 1

    def step():
        engine._iteration(engine, batchdata)  # MONAI's joint iteration, its events fired

    return step, engine


def alternate(steps: dict, repeats: int, warmup: int = 2, after_warmup=None) -> dict[str, float]:
    """Median milliseconds per call of each of ``steps``, run in turn so all see the same machine state."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    if after_warmup is not None:
        after_warmup()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for kind, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[kind].append(time.perf_counter() - t0)
    return {k: round(1000 * sorted(v)[len(v) // 2], 1) for k, v in times.items()}
