"""``loraplex train --ray``: the config's adapters as parallel Ray tasks, collected into one output folder.

Each adapter that needs training (new or changed, as ``loraplex train`` decides) is one Ray task running the
ordinary trainer on that adapter alone (``only=[name]``, sequential mode) in a private work folder, so tasks never
share checkpoints or ``state.json``. Adapters that ``stack_on`` another train in a later wave, with their trained
base copied in. The driver moves each finished adapter (and its log and loss plot) into ``<output_dir>``, then builds
the config's merges and router and writes ``state.json`` once, exactly as a local run would. An adapter trained
alone makes the same updates as in a joint run (rows of different adapters never interact), so the result equals
``loraplex train --sequential``. Config, datasets and base model must be at the same paths on every Ray node.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from loraplex.adapters.io import replace_dir
from loraplex.errors import LoraplexError
from loraplex.run import TrainedRun

WORK_DIR = ".ray-work"


def _train_one(config: Any, name: str, work_dir: str, output_dir: str, device: str | None,
               threads: int) -> dict[str, Any]:
    """Ray task: train adapter ``name`` alone into ``work_dir`` (its stack_on bases copied from ``output_dir``)."""
    import torch

    from loraplex.config import load_config
    from loraplex.train.trainer import Trainer

    torch.set_num_threads(max(1, threads))
    cfg = load_config(config, check_files=True, require_datasets=True) if isinstance(config, (str, Path)) else config
    work = TrainedRun(work_dir)
    shutil.rmtree(work.root, ignore_errors=True)
    for below in cfg.stack_chain(name):
        shutil.copytree(TrainedRun(output_dir).adapter_dir(below), work.adapter_dir(below))
    trainer = Trainer(cfg, output_dir=work.root, device=device, progress=False, joint=False,
                      log=lambda msg: print(f"[{name}] {msg}", file=sys.stderr))
    res = trainer.run(only=[name], force=True, merges_and_router=False)
    return {"losses": res.losses.get(name, []), "eval_loss": res.eval_losses.get(name), "tokens": res.tokens,
            "train_seconds": res.train_seconds, "notes": res.notes}


def _collect(work: TrainedRun, out: TrainedRun, name: str) -> None:
    """Move ``name``'s adapter folder, log and loss plot from a task's work folder into ``out``."""
    out.adapters_dir.mkdir(parents=True, exist_ok=True)
    replace_dir(work.adapter_dir(name), out.adapter_dir(name))
    for src, dst in ((work.logs_dir / f"{name}.json", out.logs_dir / f"{name}.json"),
                     (work.plots_dir / f"{name}_loss.png", out.plots_dir / f"{name}_loss.png")):
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)


def ray_train(config: Any, *, only: Sequence[str] | None = None, output_dir: str | os.PathLike | None = None,
              force: bool = False, device: str | None = None, cpus_per_task: float = 1.0,
              gpus_per_task: float | None = None, log: Callable[[str], None] | None = None) -> Any:
    """Train as Ray tasks (Ray must be initialised, see :func:`loraplex.distributed.init_ray`); a
    :class:`~loraplex.train.trainer.TrainResult` whose ``train_seconds`` is the wall time of the parallel waves.
    ``gpus_per_task`` defaults to 1 when the cluster has GPUs and ``device`` is not ``cpu``."""
    from loraplex.config import TrainConfig, load_config
    from loraplex.distributed.cluster import require_ray
    from loraplex.train.trainer import Trainer, TrainResult

    ray = require_ray()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    cfg = config if isinstance(config, TrainConfig) else load_config(config, check_files=True, require_datasets=True)
    task_config = str(cfg.source) if cfg.source is not None else cfg  # a path re-reads relative paths the same way
    planner = Trainer(cfg, output_dir=output_dir, device="cpu", progress=False, joint=True, log=log)
    out = planner.output_dir
    todo, done = planner.pending(only, force)
    waves = planner.groups(todo)  # joint planning: one list per stack_on level
    if gpus_per_task is None:
        gpus_per_task = 1.0 if ray.cluster_resources().get("GPU", 0) and device != "cpu" else 0.0
    remote = ray.remote(_train_one).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=0)
    result = TrainResult(out, [], list(done), {})
    work = out / WORK_DIR
    out.mkdir(parents=True, exist_ok=True)
    if todo:
        log(f"training {', '.join(todo)} as {len(todo)} Ray task(s) in {len(waves)} wave(s)"
            + (f"; up to date: {', '.join(done)}" if done else ""))
    t0 = time.perf_counter()
    try:
        for wave in waves:
            refs = {n: remote.remote(task_config, n, str(work / n), str(out), device, max(1, int(cpus_per_task)))
                    for n in wave}
            for n, ref in refs.items():
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the task's own error, without Ray's traceback
                    cause = getattr(exc, "cause", None) or exc
                    raise LoraplexError(f"training adapter {n!r} failed in its Ray task: {cause}") from None
                _collect(TrainedRun(work / n), TrainedRun(out), n)
                result.trained.append(n)
                result.losses[n] = list(got["losses"])
                if got["eval_loss"] is not None:
                    result.eval_losses[n] = float(got["eval_loss"])
                result.tokens += int(got["tokens"])
                result.notes.extend(got["notes"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.train_seconds = time.perf_counter() - t0
    final = Trainer(cfg, output_dir=out, device=device, progress=False, log=log)
    final.build_merges_and_router(result)
    final.write_state(result)
    return result
