"""Shared fixtures; matplotlib draws without a display."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest

from tests.helpers import make_dls, make_model


@pytest.fixture
def dls():
    return make_dls()


@pytest.fixture
def model():
    return make_model()
