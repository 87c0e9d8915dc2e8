"""The ``loraplex`` command line: each area registers its own sub-commands."""

from __future__ import annotations

import typer

from loraplex.adapters import cli as adapters_cli
from loraplex.compose import cli as compose_cli
from loraplex.demo import cli as demo_cli
from loraplex.merge import cli as merge_cli
from loraplex.serve import cli as serve_cli
from loraplex.train import cli as train_cli

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Many LoRA adapters on one base model: inspect, merge, train, predict, route, serve.")


@app.callback()
def _main() -> None:
    """Keep sub-command names even when only one command is registered."""


adapters_cli.register(app)  # inspect
merge_cli.register(app)  # merge
train_cli.register(app)  # train, predict
compose_cli.register(app)  # route
serve_cli.register(app)  # serve
demo_cli.register(app)  # demo (LLM), demo encoder

if __name__ == "__main__":
    app()
