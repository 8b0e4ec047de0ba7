"""Fixtures shared by every test module (the helpers themselves live in helpers.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_lm

from draftlm.load import LM


@pytest.fixture
def tiny_lm() -> LM:
    return make_tiny_lm()


@pytest.fixture
def one_thread():
    """Tiny models are all per-op overhead: on shared cores a second intra-op thread makes
    them many times slower, not faster. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
