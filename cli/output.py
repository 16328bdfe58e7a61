"""Output formats: one `format -> renderer` registry behind one shared option."""

from __future__ import annotations

import sys

import click


def _table(df) -> None:
    import polars as pl

    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        click.echo(df)


def _csv(df) -> None:
    click.echo(df.write_csv(), nl=False)


def _json(df) -> None:
    click.echo(df.write_json())


def _parquet(df) -> None:
    if sys.stdout.isatty():
        raise click.ClickException("parquet output is binary: redirect it to a file")
    df.write_parquet(sys.stdout.buffer)


RENDERERS = {"table": _table, "csv": _csv, "json": _json, "parquet": _parquet}


def format_option(f):
    return click.option("--format", "fmt", type=click.Choice(list(RENDERERS)), default="table",
                        show_default=True, help="Output format.")(f)


def render(df, fmt: str) -> None:
    RENDERERS[fmt](df)
