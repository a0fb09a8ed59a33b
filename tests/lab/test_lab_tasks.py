import json

import pytest

from rlsparse.errors import UsageError
from rlsparse.lab.tasks import FAMILIES, all_problems, extract_answer, load_jsonl, reward, solve, split


@pytest.mark.parametrize("family", FAMILIES)
def test_split_is_deterministic_and_disjoint(family):
    train1, test1 = split(family, seed=3, n_test=50)
    train2, test2 = split(family, seed=3, n_test=50)
    assert train1 == train2 and test1 == test2
    assert len(test1) == 50
    assert not {p.prompt for p in train1} & {p.prompt for p in test1}
    assert len(train1) + len(test1) == len(all_problems(family))


def test_different_seeds_give_different_splits():
    assert split("add", seed=0)[1] != split("add", seed=1)[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_answers_are_ground_truth(family):
    for p in all_problems(family)[::97]:
        a, b = (int(x) for x in p.prompt.rstrip("=").replace("+", " ").replace("-", " ").replace("*", " ").split())
        assert p.answer == str(solve(family, a, b))
        assert int(p.answer) >= 0


def test_reward_is_exact():
    assert reward(["46", "47", " 46", "46 junk", "460", "", "4 6"], answer=["46"] * 7) == [1, 0, 1, 1, 0, 0, 0]


def test_reward_accepts_trl_kwargs_and_conversational_completions():
    conv = [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "13"}]]
    assert reward(conv, answer=["12", "12"], prompts=["a", "b"], family=["add", "add"]) == [1.0, 0.0]


def test_reward_length_mismatch_is_a_usage_error():
    with pytest.raises(UsageError):
        reward(["1"], answer=["1", "2"])


def test_extract_answer_stops_at_separator():
    assert extract_answer("57\n1+1=2") == "57"
    assert extract_answer("57=") == "57"


def test_load_jsonl(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"prompt": "1+1=", "answer": 2}) + "\n\n")
    assert load_jsonl(good)[0].answer == "2"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\nnot json\n')
    with pytest.raises(UsageError, match="lines \\[1, 2\\]"):
        load_jsonl(bad)
    with pytest.raises(UsageError, match="cannot be read"):
        load_jsonl(tmp_path / "missing.jsonl")
