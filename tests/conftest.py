"""Fixtures shared by every test module (the helpers themselves live in helpers.py)."""

from __future__ import annotations

import pytest
from helpers import make_tiny_lm

from draftlm.load import LM


@pytest.fixture
def tiny_lm() -> LM:
    return make_tiny_lm()
