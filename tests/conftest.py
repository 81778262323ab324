"""Fixtures and hooks only; helpers shared by the tests are in helpers.py."""
import pytest
import torch

from helpers import HAS_CUDA


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Property tests: a bounded run by default (CI), a longer one on request:
# INCRKERN_HYPOTHESIS_PROFILE=long python -m pytest tests/test_optim_properties.py
try:
    import os

    from hypothesis import HealthCheck, settings

    _HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
               HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=25, deadline=None,
                              suppress_health_check=_HEALTH)
    settings.register_profile("long", max_examples=1000, deadline=None,
                              suppress_health_check=_HEALTH)
    settings.load_profile(os.environ.get("INCRKERN_HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # only the property tests need it; they import it themselves
    pass
