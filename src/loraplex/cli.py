"""The ``loraplex`` command line: each area registers its own sub-commands."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Many LoRA adapters on one base model: inspect, merge, train, predict, route, serve.")



@app.callback()
def _main() -> None:
    """Keep sub-command names even when only one command is registered."""


#: Modules that define ``register(app: typer.Typer) -> None``; a missing one is skipped.
_COMMAND_MODULES = (
    "loraplex.adapters.cli",   # inspect
    "loraplex.merge.cli",      # merge
    "loraplex.train.cli",      # train, predict
    "loraplex.compose.cli",    # route
    "loraplex.serve.cli",      # serve
    "loraplex.demo.cli",       # demo (LLM), demo encoder
)

for _mod in _COMMAND_MODULES:
    try:
        importlib.import_module(_mod).register(app)
    except ModuleNotFoundError as exc:
        if exc.name != _mod:
            raise

if __name__ == "__main__":
    app()
