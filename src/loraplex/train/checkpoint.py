"""Training checkpoints: atomic ``torch.save`` files under ``<output_dir>/checkpoints/`` plus RNG state capture."""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["capture_rng", "latest_checkpoint", "list_checkpoints", "load_checkpoint", "remove_checkpoints",
           "restore_rng", "save_checkpoint"]

_NAME = re.compile(r"^step-(\d+)\.pt$")
KEEP = 2  # newest checkpoints kept


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), Python's ``random`` and numpy (when installed)."""
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        out["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    return out


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        try:
            import numpy as np

            kind, keys, pos, has_gauss, cached = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        except ImportError:
            pass


def _py_state(st: tuple[Any, ...]) -> tuple[Any, ...]:
    version, internal, gauss = st
    return (version, list(internal), gauss)


def list_checkpoints(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, path) of the checkpoint files in ``folder``, oldest first."""
    d = Path(folder)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def save_checkpoint(folder: str | os.PathLike[str], step: int, state: dict[str, Any], keep: int = KEEP) -> Path:
    """Write ``state`` as ``folder/step-NNNNNNNN.pt`` through a temp file, fsync and rename; prune old ones."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    target = d / f"step-{step:08d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".step-", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(d)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for _, old in list_checkpoints(d)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return target


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    return torch.load(str(path), map_location="cpu", weights_only=True)


def latest_checkpoint(folder: str | os.PathLike[str], accept: Any = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest readable checkpoint (for which ``accept(state)`` is true, when given), or None."""
    for _, p in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(p)
        except Exception:  # a torn file cannot exist (atomic rename), but a foreign or old one may
            continue
        if accept is None or accept(state):
            return p, state
    return None


def remove_checkpoints(folder: str | os.PathLike[str]) -> None:
    d = Path(folder)
    for _, p in list_checkpoints(d):
        p.unlink(missing_ok=True)
    if d.is_dir():
        for p in d.glob(".step-*.tmp"):
            p.unlink(missing_ok=True)
        try:
            d.rmdir()
        except OSError:
            pass
