"""Fixtures shared by the tests; the tiny models live in tinymodels.py."""

import pytest
from tinymodels import tiny_model

from atlas.models import LoadedModel


@pytest.fixture
def tiny() -> LoadedModel:
    return tiny_model()
