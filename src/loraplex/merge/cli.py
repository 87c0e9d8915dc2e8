"""``loraplex merge``: merge named adapters into a new PEFT adapter folder, print and save the report.

    loraplex merge --sources a,b --weights 0.7,0.3 --method ties --density 0.7 --out DIR --adapters-dir ADAPTERS
    loraplex merge --sources a,b --adapter a=path/a --adapter b=path/b --method svd --svd-rank 16 --out DIR
    loraplex merge --sources path/a,path/b --method cat --out DIR      # sources may be adapter folders

Bad input prints one ``error: ...`` line on stderr and exits with code 2 (no traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loraplex.adapters.io import CONFIG_NAME, LoraAdapter, load_adapter
from loraplex.errors import LoraplexError

EXIT_BAD_INPUT = 2


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    out = []
    for t in _split(text):
        try:
            out.append(float(t))
        except ValueError:
            _fail(f"--weights: {t!r} is not a number (expected e.g. 0.7,0.3)")
    return out


def collect_sources(sources: list[str], adapters_dir: str | None, pairs: list[str],
                    trust_pickle: bool = False) -> dict[str, LoraAdapter]:
    """Load just the adapters named in ``sources``: from ``--adapter name=path`` pairs, from subfolders of
    ``--adapters-dir``, or a source that is itself an adapter folder. Unknown names raise ``UnknownAdapterError``."""
    from loraplex.errors import AdapterError, UnknownAdapterError

    paths: dict[str, Path] = {}
    if adapters_dir is not None:
        root = Path(adapters_dir)
        if not root.is_dir():
            raise AdapterError(f"--adapters-dir {adapters_dir}: not a folder")
        paths.update({p.name: p for p in sorted(root.iterdir()) if (p / CONFIG_NAME).is_file()})
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise AdapterError(f"--adapter {pair!r}: expected NAME=PATH")
        paths[name.strip()] = Path(path.strip())
    loaded: dict[str, LoraAdapter] = {}
    for s in sources:
        if s in paths:
            loaded[s] = load_adapter(paths[s], s, trust_pickle=trust_pickle)
        elif (Path(s) / CONFIG_NAME).is_file():
            loaded[s] = load_adapter(s, s, trust_pickle=trust_pickle)
        else:
            raise UnknownAdapterError(s, list(paths))
    return loaded


def register(app: typer.Typer) -> None:
    """Add the ``merge`` command to ``app``."""

    @app.command("merge")
    def merge_cmd(
        sources: str = typer.Option(..., "--sources", help="Comma-separated adapter names (or adapter folders)."),
        out: str = typer.Option(..., "--out", help="Folder to write the merged adapter (PEFT format) into."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Comma-separated weights, one per source "
                                                                          "(default 1 each)."),
        method: str = typer.Option("linear", "--method", "--combination-type",
                                   help="linear, svd, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, "
                                        "dare_ties_svd, magnitude_prune, magnitude_prune_svd, task_arithmetic."),
        density: float = typer.Option(0.5, "--density", help="Fraction kept by ties/dare/magnitude_prune, in (0, 1]."),
        majority_sign_method: str = typer.Option("total", "--majority-sign-method", help="total or frequency."),
        svd_rank: Optional[int] = typer.Option(None, "--svd-rank", help="Rank of the SVD re-factorisation."),
        svd_energy: Optional[float] = typer.Option(None, "--svd-energy",
                                                   help="Instead of --svd-rank: keep this share of the energy."),
        normalize: bool = typer.Option(True, "--normalize/--no-normalize",
                                       help="Divide the weights by the sum of their absolute values."),
        name: str = typer.Option("merged", "--name", help="Name of the merged adapter."),
        seed: int = typer.Option(0, "--seed", help="Base seed of the DARE masks."),
        peft_compat: bool = typer.Option(False, "--peft-compat",
                                         help="Reproduce PEFT add_weighted_adapter (factor-wise; NOT the weighted "
                                              "sum of deltas)."),
        adapters_dir: Optional[str] = typer.Option(None, "--adapters-dir",
                                                   help="Folder with one adapter per subfolder (names = folder names)."),
        adapter: Optional[list[str]] = typer.Option(None, "--adapter", help="NAME=PATH of one adapter; repeatable."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of a table."),
        trust_pickle: bool = typer.Option(False, "--trust-pickle",
                                          help="Allow adapter_model.bin (pickle can run arbitrary code)."),
    ) -> None:
        """Merge adapters into a new PEFT adapter; prints the report and saves it as merge_report.json."""
        from loraplex.merge.merge import REPORT_NAME, merge_adapters

        from loraplex.adapters.io import save_adapter

        names = _split(sources)
        ws = _parse_weights(weights)
        try:
            loaded = collect_sources(names, adapters_dir, list(adapter or []), trust_pickle)
            merged, report = merge_adapters(loaded, names, ws, method, density=density,
                                            majority_sign_method=majority_sign_method, svd_rank=svd_rank,
                                            svd_energy=svd_energy, normalize=normalize, name=name, seed=seed,
                                            peft_compat=peft_compat)
            path = save_adapter(merged, out, extra_files={REPORT_NAME: report.to_json()})
        except (LoraplexError, ValueError) as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"cannot write {out}: {exc}")
        typer.echo(report.to_json() if as_json else report.table())
        if not as_json:
            typer.echo(f"wrote {path} (report: {path / REPORT_NAME})")
