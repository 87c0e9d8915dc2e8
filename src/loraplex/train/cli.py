"""``loraplex train CONFIG`` and ``loraplex predict CONFIG --dataset FILE`` (also ``python -m loraplex.train``).

Bad input (config, data, adapters) prints the error message on stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any, List, NoReturn, Optional

import typer

from loraplex.errors import LoraplexError

EXIT_BAD_INPUT = 2


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _load(config: str, **kwargs: Any) -> Any:
    """``load_config``, each Ludwig key it does not honour printed as one ``warning: ...`` line on stderr."""
    from loraplex.config import LudwigConfigWarning, load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(config, **kwargs)
    for w in caught:
        if issubclass(w.category, LudwigConfigWarning):
            typer.echo(f"warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return cfg


def _with_quantize(cfg: Any, quantize: str | None) -> Any:
    """``cfg`` with ``--quantize`` (int8 / int4 / none) in place of its ``quantization`` block."""
    if quantize is None:
        return cfg
    from loraplex.config.ludwig import QuantizationConfig
    from loraplex.quant import BITS, scheme_of

    try:
        scheme = scheme_of(quantize)
    except ValueError as exc:
        _fail(f"--quantize: {exc}")
    return cfg.model_copy(update={"quantization": QuantizationConfig(bits=BITS[scheme]) if scheme else None})


QUANTIZE_HELP = "Weight-only quantized base: int8, int4 or none (default: the config's quantization.bits)."


def register(app: typer.Typer) -> None:
    """Add the ``train`` and ``predict`` commands to ``app``."""

    @app.command("train")
    def train_cmd(
        config: str = typer.Argument(..., help="Training config (YAML)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint of an interrupted run."),
        only: Optional[List[str]] = typer.Option(None, "--only", help="Train only this adapter (repeatable)."),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Where adapters, state and plots go "
                                                                          "(default: the config's output_dir)."),
        force: bool = typer.Option(False, "--force", help="Retrain even adapters whose config and data are unchanged."),
        sequential: bool = typer.Option(False, "--sequential", help="Train adapters one after another "
                                                                    "(default: the config's trainer.joint)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
        ray: bool = typer.Option(False, "--ray", help="Train each adapter as a parallel Ray task (loraplex[ray]); "
                                                      "results are collected into the same output folder."),
        ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --ray: join this Ray cluster "
                                                                               "(default: start one locally)."),
        quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    ) -> None:
        """Train the config's new or changed adapters (all in one mixed-batch job), then its merges and router."""
        from loraplex.hostmem import tune_cpu_allocator
        from loraplex.train.trainer import train

        tune_cpu_allocator()  # this process only trains: keep large freed blocks instead of page-faulting them in
        try:
            cfg = _with_quantize(_load(config, check_files=True, require_datasets=True), quantize)
            if ray or cfg.backend_type == "ray":  # Ludwig's backend: {type: ray}
                if quantize is not None:
                    _fail("--quantize applies to local training; with --ray set quantization.bits in the config")
                from loraplex.distributed.cli import train_on_ray

                result = train_on_ray(config, only=only or None, output_dir=output_dir, force=force, device=device,
                                      ray_address=ray_address)
            else:
                result = train(cfg, resume=resume, only=only or None, force=force, output_dir=output_dir,
                               device=device, progress=False if no_progress else None,
                               joint=False if sequential else None)
        except LoraplexError as exc:
            _fail(str(exc))
        for name in result.trained:
            losses = result.losses.get(name) or []
            first, last = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
            extra = f", eval loss {result.eval_losses[name]:.4f}" if name in result.eval_losses else ""
            typer.echo(f"trained {name}: {len(losses)} steps, loss {first:.4f} -> {last:.4f}{extra}")
        for name in result.skipped:
            typer.echo(f"unchanged {name}")
        for name in result.merges:
            typer.echo(f"merged {name}")
        if result.router:
            typer.echo(f"router {result.router}")
        for note in result.notes:
            typer.echo(f"note: {note}")
        if result.trained:
            typer.echo(f"{result.tokens} tokens in {result.train_seconds:.1f}s ({result.tokens_per_second:.0f} tokens/s)"
                       f" -> {result.output_dir}")

    @app.command("predict")
    def predict_cmd(
        config: str = typer.Argument(..., help="Training config (YAML) whose output folder holds the adapters."),
        dataset: str = typer.Option(..., "--dataset", help="Rows to predict (.csv, .jsonl, .json, .parquet)."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="Adapter (or merge) to use."),
        compose: Optional[str] = typer.Option(None, "--compose", help="Composition spec, e.g. 'blend(a=0.7,b=0.3)'."),
        out: Optional[str] = typer.Option(None, "--out", help="Predictions file (.csv or .jsonl)."),
        output_dir: Optional[str] = typer.Option(None, "--output-dir", help="Training output folder "
                                                                          "(default: the config's output_dir)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1,
                                                     help="Generation bound for causal LM rows."),
        device: Optional[str] = typer.Option(None, "--device"),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
        quantize: Optional[str] = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    ) -> None:
        """Write predictions for a dataset (and metrics when it has labels / responses)."""
        from loraplex.train.predict import predict

        try:
            cfg = _with_quantize(_load(config), quantize)
            res = predict(cfg, dataset, adapter=adapter, compose=compose, out=out, output_dir=output_dir,
                          batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
                          progress=False if no_progress else None)
        except LoraplexError as exc:
            _fail(str(exc))
        typer.echo(f"{res.n_rows} predictions ({res.choice}, {res.task}) -> {res.path}")
        if res.metrics:
            shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.metrics.items()
                     if k not in ("dataset", "choice", "task")}
            typer.echo(f"metrics: {json.dumps(shown)} -> {res.metrics_path}")


def main(argv: list[str] | None = None) -> None:
    """``python -m loraplex.train CONFIG [...]`` (train) or ``python -m loraplex.train predict CONFIG ...``."""
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    register(app)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in ("train", "predict", "--help", "-h"):
        args = ["train"] + args
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(args=args, prog_name="python -m loraplex.train")
