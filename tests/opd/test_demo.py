"""``tipkernels demo``: the task registry, the ``--compare`` syntax, and a ``--quick`` comparison on the long task.

Everything runs on the CPU with tiny models built in code (no downloads).
"""

import json
import math
import random
import re

import pytest

from tipkernels.opd.cli import main as cli_main
from tipkernels.opd.demo import Entry, build_tokenizer, parse_compare
from tipkernels.opd.tasks import TASKS, add_scratchpad, add_task, digit_score, get_task


# ----------------------------------------------------------------------------------------------------- tasks


def _parse_scratchpad(prompt, response):
    """Independent reading of an add response: returns (a, b, columns, answer) from the text alone."""
    a, b = prompt[:-1].split("+")
    pad, _, answer = response.partition("|")
    groups = pad.split(";")
    assert groups[-1] == ""
    return int(a), int(b), groups[:-1], int(answer)


def test_registry_names_and_vocabularies():
    assert set(TASKS) >= {"sort", "add"}
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        assert len(set(task.vocab)) == len(task.vocab)
        tok = build_tokenizer(task.vocab)
        for p, a in task.examples(50, seed=1):
            assert set(p + a) <= set(task.vocab)
            ids = tok(p + a)["input_ids"]
            assert len(ids) == len(p + a) and tok.decode(ids) == p + a  # one token per character, round trip
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


@pytest.mark.parametrize("digits, lo, hi", [((5, 5), 32, 33), ((5, 8), 32, 51)])
def test_add_task_answers_and_lengths(digits, lo, hi):
    task = get_task("add") if digits == (5, 5) else add_task(*digits)  # the default, and unequal operand lengths
    lengths = []
    for p, a in task.examples(3000, seed=7):
        x, y, columns, answer = _parse_scratchpad(p, a)
        assert digits[0] <= len(str(x)) <= digits[1] and digits[0] <= len(str(y)) <= digits[1]
        assert answer == x + y  # checked with Python's integers, not the generator's column arithmetic
        assert len(columns) == max(len(str(x)), len(str(y)))
        carry = 0
        for i, col in enumerate(columns):  # every column group: a_i b_i carry-in digit
            assert len(col) == 4
            da, db, c, d = map(int, col)
            assert da == (x // 10 ** i) % 10 and db == (y // 10 ** i) % 10 and c == carry
            assert d == (da + db + c) % 10 == (answer // 10 ** i) % 10
            carry = (da + db + c) // 10
        m = len(a) + 1  # response tokens with EOS
        lengths.append(m)
        assert task.min_response <= m <= task.max_response
        assert math.floor(0.2 * m) >= 6  # ρ = 0.2 keeps at least 6 tokens of every sequence
        assert task.check(p, a)
    assert min(lengths) == task.min_response == lo and max(lengths) == task.max_response == hi
    assert 30 <= min(lengths) and max(lengths) <= 80
    assert add_scratchpad(4728, 915) == "8503;2114;7906;4015;|5643"
    assert add_scratchpad(47281, 91536) == "1607;8301;2518;7108;4903;|138817"


def test_add_checker_rejects_wrong_answers():
    task = get_task("add")
    p, a = "4728+915=", add_scratchpad(4728, 915)
    assert task.check(p, a)
    assert task.check(p, "garbage|5643")  # the scratchpad is not graded, only the final answer
    for bad in ("", "8503;2114;7906;4015;|5644", "8503;2114;7906;4015;5643", "|05643", "|5643x", "|", "|56|43"):
        assert not task.check(p, bad), bad


def test_digit_score_partial_credit():
    assert digit_score("5643", "5643") == 1.0
    assert digit_score("5643", "5644") == 0.75  # right-aligned: the last digit is wrong
    assert digit_score("5643", "643") == 0.75  # a missing leading digit costs one position of four
    assert digit_score("5643", "15643") == 0.8  # an extra digit: four of five positions agree
    assert digit_score("5643", "") == 0.0 and digit_score("", "") == 1.0
    task = get_task("add")
    p = "47281+91536="
    assert task.score(p, add_scratchpad(47281, 91536)) == 1.0
    assert task.score(p, "anything|138817") == 1.0  # the scratchpad is not graded
    assert task.score(p, "1607;|138807") == pytest.approx(5 / 6)
    assert task.score(p, "1607;8301;") == 0.0  # no answer
    for prompt, a in task.examples(200, seed=3):  # 1.0 exactly when the checker accepts
        for resp in (a, a[:-1], a + "1", a.replace("|", "")):
            assert (task.score(prompt, resp) == 1.0) == task.check(prompt, resp)
    sort = get_task("sort")
    assert sort.score("50391>", "01359") == 1.0 and sort.score("50391>", "01395") == 0.6


def test_sort_checker_matches_exact_answers():
    task = get_task("sort")
    rng = random.Random(3)
    for p, a in task.examples(200, seed=2):
        assert task.check(p, a) and 5 <= len(a) + 1 <= 9
        wrong = list(a)
        wrong[rng.randrange(len(a))] = str((int(wrong[0]) + 1) % 10) if len(set(a)) == 1 else wrong[0]
        if "".join(wrong) != a:
            assert not task.check(p, "".join(wrong))
        assert not task.check(p, a[:-1]) and not task.check(p, a + "9")


# ---------------------------------------------------------------------------------------------- --compare


def test_parse_compare_per_entry_ratios():
    got = parse_compare("all,random@0.2,entropy_sample@0.5,entropy_sample@0.2,soft_or@0.5,soft_or@0.2,q3@0.2", 0.5)
    assert got == [Entry("all", 1.0), Entry("random", 0.2), Entry("entropy_sample", 0.5),
                   Entry("entropy_sample", 0.2), Entry("soft_or", 0.5), Entry("soft_or", 0.2), Entry("q3", 0.2)]
    assert [e.label for e in got[:3]] == ["all", "random@0.2", "entropy_sample@0.5"]
    # the old form: bare rules take --ratio; spaces are tolerated; all@1 is all
    assert parse_compare("all, entropy_sample,soft_or,q3", 0.2) == [
        Entry("all", 1.0), Entry("entropy_sample", 0.2), Entry("soft_or", 0.2), Entry("q3", 0.2)]
    assert parse_compare("all@1,q3@1", 0.3) == [Entry("all", 1.0), Entry("q3", 1.0)]


@pytest.mark.parametrize("text, match", [
    ("", "at least one entry"),
    ("all,,q3", "empty entry"),
    ("bogus@0.2", "unknown rule 'bogus'"),
    ("soft_or@x", "ratio 'x' is not a number"),
    ("soft_or@0", r"ratio must lie in \(0, 1\]"),
    ("soft_or@1.5", r"ratio must lie in \(0, 1\]"),
    ("soft_or@nan", r"ratio must lie in \(0, 1\]"),
    ("all@0.5", "'all' keeps every token"),
    ("q3@0.2,q3@0.2", "listed twice"),
    ("q3,q3@0.2", "listed twice"),
])
def test_parse_compare_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_compare(text, 0.2)


@pytest.mark.parametrize("argv, match", [
    (["--compare", "soft_or@2"], r"entry 'soft_or@2': ratio must lie in \(0, 1\]"),
    (["--compare", "nope"], "unknown rule 'nope'"),
    (["--seeds", "0"], "--seeds must be ≥ 1"),
])
def test_cli_rejects_bad_compare_before_training(argv, match, capsys, tmp_path):
    assert cli_main(["demo", "--task", "add", "--output-dir", str(tmp_path), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not any(tmp_path.iterdir())  # nothing trained or written


def test_cli_rejects_unknown_task(capsys):
    with pytest.raises(SystemExit):
        cli_main(["demo", "--task", "nope"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- --quick, end to end


@pytest.mark.slow  # trains a teacher and three students
def test_quick_compare_on_add_task(tmp_path, capsys):
    out = tmp_path / "demo"
    entries = "all,random@0.2,soft_or@0.5,q3@0.2"
    assert cli_main(["demo", "--task", "add", "--quick", "--compare", entries, "--seeds", "2", "--no-progress",
                     "--output-dir", str(out)]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    table = (out / "compare.md").read_text()
    assert summary["task"] == "add" and summary["seeds"] == [0, 1]
    assert 0 <= summary["teacher_accuracy"] <= 1
    assert len(summary["student_accuracy_before_per_seed"]) == 2
    assert len(summary["student_digit_accuracy_before_per_seed"]) == 2
    # the warm start checks for its target every 10 steps: it stops at a multiple of 10, or runs all 20 steps
    assert all(w in (10, 20) for w in summary["student_warm_start_steps_per_seed"])
    assert 0 <= summary["teacher_accuracy"] <= summary["teacher_digit_accuracy"] <= 1
    labels = ["all", "random@0.2", "soft_or@0.5", "q3@0.2"]
    assert list(summary["entries"]) == labels
    steps = summary["settings"]["opd_steps"]
    valid = None
    for label in labels:
        e = summary["entries"][label]
        assert len(e["per_seed"]) == 2
        for run in e["per_seed"]:
            assert 0 <= run["accuracy_after"] <= run["digit_accuracy_after"] <= 1  # exact match gets every digit
            assert [s for s, _ in run["curve"]][0] == 0 and run["curve"][-1][0] == steps
            assert [s for s, _ in run["digit_curve"]] == [s for s, _ in run["curve"]]
            assert run["digit_curve"][-1][1] == run["digit_accuracy_after"]
            assert abs(sum(run[f"Q{q}"] for q in range(1, 5)) - 1) < 1e-6
            assert 0 < run["tokens_trained"] <= run["tokens_valid"]
        mean = sum(r["accuracy_after"] for r in e["per_seed"]) / 2
        assert abs(e["accuracy_after_mean"] - mean) < 1e-12 and e["accuracy_after_std"] >= 0
        if e["rule"] == "all":
            assert e["fraction_mean"] == 1.0
            valid = e["tokens_trained_mean"]
        else:  # per-sequence budget ⌊ρ·m⌋ of each sequence's m valid tokens
            assert 0 < e["fraction_mean"] <= e["ratio"]
        assert 0 < e["loss_step_memory_mb"] < 4096
        assert f"| {e['rule']} | " in table
    assert valid is not None and valid > 0
    mem = {label: summary["entries"][label]["loss_step_memory_mb"] for label in labels}
    assert mem["all"] >= max(mem.values())  # the same batch: keeping every token saves the most for backward
    assert "±" in table and "Q1" in table and "loss-step saved activations" in table and "digits after" in table
    assert "accuracy" in text and "peak" in text
    if summary["figure"]:
        assert (out / "compare.png").is_file()
    else:
        assert "no figure" in text
