"""Fixtures for the training tests; helpers live in trainhelpers.py."""

from __future__ import annotations

import pytest

from trainhelpers import make_tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer()
