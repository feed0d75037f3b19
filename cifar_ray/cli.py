"""The `cifar-ray` command line: each command turns its options into a config and calls the
library. Bad input surfaces as a `UserError`, printed as one line with exit status 2."""

from __future__ import annotations

import sys

import click

from cifar_ray import __version__
from cifar_ray.errors import UserError


class _Group(click.Group):
    """A click group that prints a UserError as one line on stderr and exits 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cifar-ray")
def main():
    """Train CNNs on CIFAR-10 with Ray Train and run ablations with Ray Tune + ASHA."""


def _register_commands():
    from cifar_ray.data.cli import data
    from cifar_ray.models.cli import models

    main.add_command(data)
    main.add_command(models)


_register_commands()
