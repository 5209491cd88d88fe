"""The benchmarks' one error type."""

from __future__ import annotations

import click


class BenchError(click.ClickException):
    """One error line, exit status 2."""

    exit_code = 2
