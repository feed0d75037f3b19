"""`cifar-ray data ...` (prepare, info)."""

import click


@click.group()
def data():
    """Prepare and inspect datasets."""
