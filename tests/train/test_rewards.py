"""The built-in verifiable-answer reward and loading user rewards."""

from __future__ import annotations

import pytest

from rlsparse.errors import UsageError
from rlsparse.train.rewards import exact_answer, final_answer, load_reward


@pytest.mark.parametrize("text,answer", [
    ("so x = \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
    ("The answer is 1,234.", "1234"),
    ("first 3 then 4, finally 12", "12"),
    ("Answer: $5$", "5"),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_exact_answer_reward_handles_text_and_conversations():
    completions = [" so it is 4", [{"role": "assistant", "content": "#### 5"}], "no idea"]
    assert exact_answer(completions, answer=["4", "#### 4", "4"]) == [1.0, 0.0, 0.0]


def test_load_reward(tmp_path):
    assert load_reward("exact_answer") is exact_answer
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kw):\n    return [1.0 for _ in completions]\n")
    assert load_reward(f"{tmp_path / 'my_rewards.py'}:short")(["a"]) == [1.0]
    assert load_reward("rlsparse.train.rewards:exact_answer") is exact_answer
    with pytest.raises(UsageError, match="cannot import"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(UsageError, match="has no function"):
        load_reward("rlsparse.train.rewards:nope")
