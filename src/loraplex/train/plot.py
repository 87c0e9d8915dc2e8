"""Loss-curve PNGs drawn with matplotlib (a core dependency; no pyplot, so no global backend state), or, should
matplotlib fail to import, a tiny pure-Python PNG line plot (no text)."""

from __future__ import annotations

import math
import os
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Sequence

__all__ = ["plot_losses"]


def plot_losses(path: str | os.PathLike[str], title: str, losses: Sequence[float],
                eval_losses: Sequence[tuple[int, float]] | None = None) -> Path:
    """Write a loss curve (loss per optimizer step, plus a smoothed line) to ``path`` (PNG), atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=".png", dir=p.parent)
    os.close(fd)
    try:
        try:
            _plot_matplotlib(tmp, title, losses, eval_losses)
        except ImportError:
            _plot_plain(tmp, losses)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _plot_matplotlib(path: str, title: str, losses: Sequence[float],
                     eval_losses: Sequence[tuple[int, float]] | None) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global state, thread safe

    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, list(losses), color="#9ab", linewidth=1, label="loss (per step)")
    if len(losses) >= 5:
        ax.plot(steps, _smooth(list(losses), max(2, len(losses) // 10)), color="#13a", linewidth=2,
                label="smoothed")
    if eval_losses:
        ax.plot([s for s, _ in eval_losses], [v for _, v in eval_losses], "o-", color="#c40", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_plain(path: str, losses: Sequence[float], width: int = 480, height: int = 288) -> None:
    """A white PNG with axes and the loss polyline (no labels): enough to see the trend without matplotlib."""
    px = [[(255, 255, 255)] * width for _ in range(height)]
    m = 24
    for x in range(m, width - m):
        px[height - m][x] = (0, 0, 0)
    for y in range(m, height - m + 1):
        px[y][m] = (0, 0, 0)
    vals = [v for v in losses if math.isfinite(v)]
    if vals:
        lo, hi = min(vals), max(vals)
        span = hi - lo or 1.0
        n = len(losses)

        def xy(i: int, v: float) -> tuple[int, int]:
            x = m + int((width - 2 * m - 1) * (i / max(n - 1, 1)))
            y = height - m - 1 - int((height - 2 * m - 2) * ((v - lo) / span))
            return x, y

        pts = [xy(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] or pts):
            steps = max(abs(x1 - x0), abs(y1 - y0), 1)
            for k in range(steps + 1):
                x = x0 + (x1 - x0) * k // steps
                y = y0 + (y1 - y0) * k // steps
                for dy in (0, 1):
                    if 0 <= y + dy < height:
                        px[y + dy][x] = (17, 51, 170)
    raw = b"".join(b"\x00" + bytes(c for rgb in row for c in rgb) for row in px)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
