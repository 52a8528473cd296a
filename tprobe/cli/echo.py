"""Console output shared by the commands: tables, exit statuses."""

from __future__ import annotations

import sys

import click

EXIT_SKIPPED = 3  # finished, but some input files were skipped (listed on stderr)


def finish(pre):
    if pre.skipped:
        click.echo(f"{len(pre.skipped)} file(s) skipped (listed above); exit status {EXIT_SKIPPED}", err=True)
        sys.exit(EXIT_SKIPPED)


def table_text(df, floatfmt="{:.3f}") -> str:
    import pandas as pd

    with pd.option_context(
        "display.width", 200, "display.max_columns", 30, "display.float_format", floatfmt.format
    ):
        return df.to_string(index=False)


def echo_table(df, floatfmt="{:.3f}"):
    click.echo(table_text(df, floatfmt))
