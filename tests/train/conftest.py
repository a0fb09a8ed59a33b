"""Fixtures for the training tests; helpers live in trainhelpers.py."""

from __future__ import annotations

import pytest

from trainhelpers import make_tokenizer, make_model, random_mask, ones_mask, params_of, int_view, assert_masked_training  # noqa: F401


@pytest.fixture
def tokenizer():
    return make_tokenizer()
