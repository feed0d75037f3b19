import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    """Every test gets its own cache (CIFAR_RAY_HOME): no test reads or writes ~/.cache."""
    home = tmp_path / "cifar-ray-home"
    monkeypatch.setenv("CIFAR_RAY_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One small local Ray instance for the whole session (logical CPUs may exceed cores)."""
    ray = pytest.importorskip("ray")
    os.environ.pop("RAY_ADDRESS", None)
    # The dashboard serves the State API, which multi-worker sweeps need (tune.check_state_api).
    from cifar_ray.train import init_local  # on 127.0.0.1, as every Ray cifar-ray starts

    init_local(num_cpus=4, include_dashboard=True, log_to_driver=False,
               object_store_memory=300 * 1024**2, logging_level="WARNING",
               _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()
