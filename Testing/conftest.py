"""Shared pytest fixtures: small volumes with non-trivial geometry."""

from __future__ import annotations

import numpy as np
import pytest


def rotation_direction(ax: float = 10.0, ay: float = -20.0, az: float = 30.0) -> tuple[float, ...]:
    """Row-major 3x3 proper rotation (det +1) from x/y/z angles in degrees."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return tuple(float(v) for v in (rz @ ry @ rx).ravel())


@pytest.fixture
def oblique_volume():
    """(7, 9, 11) integer-valued HU-like volume, oblique direction, anisotropic spacing,
    non-zero origin."""
    from MedTranslateLib.io import Volume

    rng = np.random.default_rng(0)
    array = np.rint(rng.normal(0, 300, (7, 9, 11))).astype(np.float32)
    return Volume(array, spacing=(0.7, 1.3, 2.9), origin=(-12.3, 45.6, 7.8),
                  direction=rotation_direction(), source="oblique")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is faster than two on a 2-core machine and keeps
    parallel test processes (DDP) from oversubscribing the cores."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True, scope="session")
def _own_medtranslate_home(tmp_path_factory):
    """A MEDTRANSLATE_HOME of the test session's own: the user's model store and ONNX export cache
    (``~/.medtranslate``) are never read or written by a test (tests that need one of their own
    set it again)."""
    import os

    before = os.environ.get("MEDTRANSLATE_HOME")
    os.environ["MEDTRANSLATE_HOME"] = str(tmp_path_factory.mktemp("medtranslate-home"))
    yield
    if before is None:
        os.environ.pop("MEDTRANSLATE_HOME", None)
    else:
        os.environ["MEDTRANSLATE_HOME"] = before
