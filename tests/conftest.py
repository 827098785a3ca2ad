import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from dist_cluster import Clusters  # noqa: E402


@pytest.fixture(scope="session")
def clusters():
    """``clusters(P)``: a live P-process gloo cluster, shared by the whole session."""
    pool = Clusters()
    yield pool
    pool.close()


@pytest.fixture
def accept_tiny_cifar(monkeypatch):
    """Tiny CIFAR batches written by the tests cannot match the published md5 sums that
    torchvision's CIFAR classes check; accept them."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
