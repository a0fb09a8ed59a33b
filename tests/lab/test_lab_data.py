from rlsparse.lab.data import constructed_pairs, grpo_rows, policy_pairs, rft_rows, sft_rows
from rlsparse.lab.tasks import extract_answer, split

PROBLEMS = split("add", seed=0, n_test=20)[1]


def _fake_samples():
    # problem i: correct sample only if i % 3 == 0, wrong only if i % 3 == 1, both if i % 3 == 2
    out = []
    for i, p in enumerate(PROBLEMS):
        wrong = str(int(p.answer) + 1)
        out.append([p.answer, p.answer] if i % 3 == 0 else [wrong, wrong + "9"] if i % 3 == 1 else [wrong, p.answer])
    return out


def test_policy_pairs_chosen_correct_rejected_wrong():
    rows = policy_pairs(PROBLEMS, _fake_samples())
    assert len(rows) == sum(1 for i in range(len(PROBLEMS)) if i % 3 == 2)
    answers = {p.prompt: p.answer for p in PROBLEMS}
    for r in rows:
        assert extract_answer(r["chosen"]) == answers[r["prompt"]]
        assert extract_answer(r["rejected"]) != answers[r["prompt"]]


def test_rft_rows_keep_only_correct_samples():
    rows = rft_rows(PROBLEMS, _fake_samples())
    answers = {p.prompt: p.answer for p in PROBLEMS}
    assert rows and all(r["completion"] == answers[r["prompt"]] for r in rows)
    assert len(rows) == sum(1 for i in range(len(PROBLEMS)) if i % 3 != 1)


def test_constructed_pairs_are_deterministic_and_wrong():
    rows = constructed_pairs(PROBLEMS, seed=1)
    assert rows == constructed_pairs(PROBLEMS, seed=1)
    for p, r in zip(PROBLEMS, rows):
        assert r["chosen"] == p.answer
        assert r["rejected"] != p.answer and len(r["rejected"]) == len(p.answer)
        assert not (len(r["rejected"]) > 1 and r["rejected"].startswith("0"))


def test_sft_and_grpo_rows_carry_ground_truth():
    assert sft_rows(PROBLEMS[:1]) == [{"prompt": PROBLEMS[0].prompt, "completion": PROBLEMS[0].answer}]
    assert grpo_rows(PROBLEMS[:1]) == [{"prompt": PROBLEMS[0].prompt, "answer": PROBLEMS[0].answer, "style": "plain"}]
