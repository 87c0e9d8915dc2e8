"""The dataset cache: one folder per dataset with ``<split>.jsonl``, ``<split>.csv`` and a ``manifest.json`` of
the build parameters, read back when the parameters match.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from loraplex.demo.sources import SourceSet, stdlib_dir
from loraplex.demo.text import SPLITS, split_for

#: Bump when the recipe changes so that stale caches are rebuilt.
FORMAT_VERSION = 1


def default_cache_dir() -> Path:
    """Data cache folder: ``$LORAPLEX_CACHE/data`` if the variable is set, else ``~/.cache/loraplex/data``."""
    env = os.environ.get("LORAPLEX_CACHE")
    if env:
        return Path(env).expanduser() / "data"
    return Path.home() / ".cache" / "loraplex" / "data"


def _csv_value(v: Any) -> Any:
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _write_dataset(folder: Path, name: str, data: Mapping[str, list[dict[str, Any]]], manifest: dict[str, Any]) -> None:
    """Write ``<split>.jsonl`` and ``<split>.csv`` for every split, then ``manifest.json`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        jl = folder / f"{split}.jsonl"
        tmp = jl.with_suffix(f".jsonl.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, jl)
        cols = list(rows[0].keys()) if rows else ["text", "label", "source"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_value(row.get(k)) for k in cols})
        tmp = folder / f"{split}.csv.{os.getpid()}.tmp"
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        os.replace(tmp, folder / f"{split}.csv")
    tmp = folder / f"manifest.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / "manifest.json")


def _read_cached(folder: Path, params: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]] | None:
    """Rows from a cached dataset folder if its manifest's build parameters equal ``params``."""
    mpath = folder / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("params") != json.loads(json.dumps(params)):
        return None
    out: dict[str, list[dict[str, Any]]] = {}
    try:
        for split in manifest.get("splits", SPLITS):
            with open(folder / f"{split}.jsonl", encoding="utf-8") as fh:
                out[split] = [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError):
        return None
    if any(len(out[s]) != manifest.get("counts", {}).get(s) for s in out):
        return None
    return out


def build_params(name: str, seed: int, sizes: Mapping[str, int], max_files: int, extra: Mapping[str, Any] | None,
                 sources: Mapping[str, SourceSet] | None) -> dict[str, Any]:
    """Build parameters of a dataset, as its manifest records them: a cached dataset is used only when they match."""
    p: dict[str, Any] = {
        "dataset": name,
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sizes": {s: int(sizes.get(s, 0)) for s in SPLITS},
        "max_files": max_files,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "stdlib": stdlib_dir(),
        "sources": "auto" if sources is None else _fingerprint(sources),
    }
    if extra:
        p.update(extra)
    return p


def _fingerprint(sources: Mapping[str, SourceSet]) -> str:
    h = hashlib.sha256()
    for k in sorted(sources):
        h.update(k.encode())
        for f in sources[k].files:
            h.update(b"\0" + f.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def _label_counts(data: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for split, rows in data.items():
        c: Counter[str] = Counter()
        for r in rows:
            if "label" in r:
                c[r["label"]] += 1
            else:
                for sp in r.get("spans", []):
                    c[sp["label"]] += 1
                if not r.get("spans"):
                    c["(none)"] += 1
        out[split] = dict(sorted(c.items()))
    return out


def cached_build(
    name: str,
    params: dict[str, Any],
    cache_dir: str | os.PathLike[str] | None,
    use_cache: bool,
    build: Callable[[], tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]],
    description: str,
) -> dict[str, list[dict[str, Any]]]:
    """Dataset ``name``: read from ``cache_dir/name`` (default :func:`default_cache_dir`) when ``use_cache`` and the
    manifest's parameters equal ``params``; else ``build()`` (rows, info), written there with its manifest when
    ``use_cache``. ``info`` gives the manifest's ``source_files``, ``searched`` and ``details``."""
    folder = Path(cache_dir).expanduser() / name if cache_dir is not None else default_cache_dir() / name
    if use_cache:
        cached = _read_cached(folder, params)
        if cached is not None:
            return cached
    t0 = time.perf_counter()
    data, info = build()
    manifest = {
        "dataset": name,
        "params": params,
        "splits": list(data),
        "counts": {s: len(rows) for s, rows in data.items()},
        "label_counts": _label_counts(data),
        "files": {s: {"jsonl": f"{s}.jsonl", "csv": f"{s}.csv"} for s in data},
        "source_files": info.get("source_files", {}),
        "searched": info.get("searched", {}),
        "build_seconds": round(time.perf_counter() - t0, 3),
        "description": description,
    }
    if "details" in info:
        manifest["details"] = info["details"]
    if use_cache:
        _write_dataset(folder, name, data, manifest)
    return data


def source_info(sources: Mapping[str, SourceSet], kinds: Iterable[str]) -> dict[str, Any]:
    """Manifest info of the source kinds ``kinds``: files per split, folders searched."""
    kinds = [k for k in kinds if k in sources]
    return {
        "source_files": {
            k: {s: sum(1 for f in sources[k].files if split_for(f) == s) for s in SPLITS} for k in kinds
        },
        "searched": {k: sources[k].searched for k in kinds},
    }

