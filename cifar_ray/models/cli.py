"""`cifar-ray models ...` (list, show)."""

import click


@click.group()
def models():
    """List and inspect models and layer specs."""
