"""``loraplex demo``: the LLM demo (SmolLM2-135M-Instruct); ``loraplex demo encoder``: the multi-task encoder demo."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``demo`` group: with no sub-command it runs the LLM demo; ``encoder`` runs the MiniLM demo."""
    demo = typer.Typer(add_completion=False, help="End-to-end demos on the embedded models (nothing downloaded).")

    @demo.callback(invoke_without_command=True)
    def llm_cmd(ctx: typer.Context,
                out_dir: str = typer.Option("runs/llm-demo", help="output folder"),
                train_rows: int = typer.Option(40, "--train-rows", help="training rows per adapter"),
                test_rows: int = typer.Option(12, "--test-rows", help="held-out rows per domain"),
                epochs: int = typer.Option(2), seed: int = typer.Option(0),
                learning_rate: float = typer.Option(2e-3, "--learning-rate", help="adapters' learning rate"),
                top_layers: int = typer.Option(4, "--top-layers", help="LoRA on the model's top N layers"),
                base: str = typer.Option("smollm2-135m-instruct", "--base", help="base model (name, folder, hub id)"),
                no_serve: bool = typer.Option(False, "--no-serve", help="skip the chat completions over HTTP"),
                ) -> None:
        """Train, merge, route, evaluate and serve three LoRA adapters on the embedded SmolLM2-135M-Instruct."""
        if ctx.invoked_subcommand is not None:
            return
        from loraplex.demo.llm import DemoSettings, run_demo

        settings = DemoSettings(train_rows=train_rows, test_rows=test_rows, epochs=epochs, seed=seed,
                                learning_rate=learning_rate, top_layers=top_layers, base_model=base)
        run_demo(out_dir, settings, serve=not no_serve)

    @demo.command("encoder")
    def encoder_cmd(out_dir: str = typer.Option("runs/demo", help="output folder"),
                    per_class: int = typer.Option(80, help="training rows per class"),
                    epochs: int = typer.Option(3), seed: int = typer.Option(0),
                    learning_rate: float = typer.Option(2e-3, "--learning-rate", help="adapters' learning rate"),
                    max_length: int = typer.Option(48, "--max-length", help="tokens per text"),
                    no_serve: bool = typer.Option(False, "--no-serve", help="skip the HTTP classify request")) -> None:
        """Train, merge, route and evaluate three task adapters on the embedded MiniLM encoder."""
        from loraplex.demo.encoder import run_demo

        run_demo(out_dir, per_class=per_class, epochs=epochs, seed=seed, serve=not no_serve,
                 learning_rate=learning_rate, max_length=max_length)

    app.add_typer(demo, name="demo")
