"""The `actwh` command group. Commands are thin: one library call each, errors as one line."""

from __future__ import annotations

import click

from actwh import __version__
from actwh.errors import ActwhError


class Group(click.Group):
    """Turns the library's typed errors into one-line messages with exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ActwhError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=Group)
@click.version_option(__version__, prog_name="actwh")
def cli() -> None:
    """actwh: an activation warehouse for transformer interpretability.

    Populate a DuckDB file with activations and attributions, then ask it questions in SQL.
    """


model_option = click.option(
    "--model", "model_path", default=None, metavar="DIR",
    help="Hugging Face checkpoint folder or local cache name (default: the embedded model).")
device_option = click.option("--device", default=None, help="cuda or cpu (default: cuda if present).")


@cli.command()
@click.argument("text")
@model_option
@device_option
@click.option("-k", default=5, show_default=True, help="How many next tokens to show.")
def predict(text: str, model_path: str | None, device: str | None, k: int) -> None:
    """Show the model's top-k next tokens after TEXT."""
    from actwh.compute.loading import load_model
    from actwh.compute.inference import top_next_tokens

    loaded = load_model(model_path, device=device)
    for token, prob in top_next_tokens(loaded, text, k):
        click.echo(f"{prob:8.4f}  {token!r}")


@cli.command()
@model_option
def sites(model_path: str | None) -> None:
    """List the model's hook sites (the names hooks, scalars and SQL use)."""
    from actwh.compute.loading import load_model

    for name in load_model(model_path, device="cpu").model.hook_points:
        click.echo(name)
