import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own cache (CIFAR_RAY_HOME): no test reads or writes ~/.cache."""
    home = tmp_path / "cifar-ray-home"
    monkeypatch.setenv("CIFAR_RAY_HOME", str(home))
    return home
