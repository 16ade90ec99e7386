"""The demo's built-in tasks: one registry, name → prompt generator, answer checker, vocabulary.

Every task is character level: its vocabulary is a string of single characters (the tokenizer adds ``<pad>`` and
``<eos>``), a prompt is a string, the target response is a string followed by EOS. ``check(prompt, response)``
decides whether a decoded response is correct, computing the answer itself (it does not compare with the target
string, so a task's generator and checker are independent of each other); ``score(prompt, response)`` is the
smoother partial credit in [0, 1] reported beside it (the share of the answer's digits that are right, 1 exactly
when ``check`` holds).

- ``sort`` (the quick default): ``"50391>"`` → ``"01359"``; responses of 5–9 tokens with EOS.
- ``add``: addition of two 5-digit numbers written out column by column with the carry,
  ``"47281+91536="`` → ``"1607;8301;2518;7108;4903;|138817"`` (one ``a b carry digit;`` group per column, least
  significant first, then ``|`` and the sum); responses of 32–33 tokens with EOS, so a retention ratio of 0.2
  keeps at least 6 tokens of every sequence. Most of a response is copying and formatting a tiny model gets
  right early; the carries and sum digits are what separates a weak student from the teacher.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

DIGITS = "0123456789"


@dataclass(frozen=True)
class Task:
    """One built-in task.

    name: registry key; summary: one line for the log; vocab: the characters prompts and responses use;
    sample(rng) → (prompt, target response without EOS); check(prompt, response) → bool;
    score(prompt, response) → float in [0, 1], the per-digit accuracy of the answer (1.0 iff ``check``);
    min_response / max_response: response lengths in tokens including EOS (every sample lies in this range).
    """

    name: str
    summary: str
    vocab: str
    sample: Callable[[random.Random], Tuple[str, str]]
    check: Callable[[str, str], bool]
    score: Callable[[str, str], float]
    min_response: int
    max_response: int

    def examples(self, n: int, seed: int) -> List[Tuple[str, str]]:
        """``n`` (prompt, target) pairs drawn from ``random.Random(seed)``."""
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]

    @property
    def max_new_tokens(self) -> int:
        return self.max_response  # the longest response, EOS included


def digit_score(answer: str, got: str) -> float:
    """Per-digit accuracy of ``got`` against the unique right ``answer``: right-aligned positions that agree,
    over the longer of the two lengths (a missing or extra digit counts as wrong); 1.0 iff ``got == answer``."""
    n = max(len(answer), len(got))
    if n == 0:
        return 1.0
    a, g = answer.rjust(n, " "), got.rjust(n, " ")
    return sum(x == y != " " for x, y in zip(a, g)) / n


# ------------------------------------------------------------------------------------------------------ sort


def sort_task(min_len: int = 4, max_len: int = 8) -> Task:
    """Sort ``min_len``–``max_len`` random digits; the prompt ends with ``>``."""

    def sample(rng: random.Random) -> Tuple[str, str]:
        s = "".join(rng.choice(DIGITS) for _ in range(rng.randint(min_len, max_len)))
        return s + ">", "".join(sorted(s))

    def check(prompt: str, response: str) -> bool:
        digits = prompt[:-1]
        return (len(response) == len(digits) and all(response[i] <= response[i + 1] for i in range(len(response) - 1))
                and all(response.count(d) == digits.count(d) for d in DIGITS))

    def score(prompt: str, response: str) -> float:
        return digit_score("".join(sorted(prompt[:-1])), response)  # the sorted string is the only right answer

    return Task("sort", f"sort {min_len}-{max_len} digits ('50391>' -> '01359')", DIGITS + ">", sample, check,
                score, min_len + 1, max_len + 1)


# ------------------------------------------------------------------------------------------------------- add


def add_scratchpad(a: int, b: int) -> str:
    """The ``add`` task's response for ``a + b`` (no EOS): column groups ``a_i b_i c_i s_i;`` then ``|`` and the sum."""
    x, y = str(a)[::-1], str(b)[::-1]
    n = max(len(x), len(y))
    x, y = x.ljust(n, "0"), y.ljust(n, "0")
    carry, parts = 0, []
    for i in range(n):
        t = int(x[i]) + int(y[i]) + carry
        parts.append(f"{x[i]}{y[i]}{carry}{t % 10};")
        carry = t // 10
    return "".join(parts) + "|" + str(a + b)


def add_task(min_digits: int = 5, max_digits: int = 5) -> Task:
    """Add two numbers of ``min_digits``–``max_digits`` digits each (lengths drawn independently; operands of
    unequal length pad the shorter one with 0 in the scratchpad). Default: exactly 5 digits, which a 0.5M-parameter
    teacher learns in a few hundred supervised steps."""

    def number(rng: random.Random) -> int:
        n = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (n - 1), 10 ** n - 1)

    def sample(rng: random.Random) -> Tuple[str, str]:
        a, b = number(rng), number(rng)
        return f"{a}+{b}=", add_scratchpad(a, b)

    def check(prompt: str, response: str) -> bool:
        # The final answer (after "|") must be the sum; the scratchpad is not graded (as for a worked solution).
        a, b = prompt[:-1].split("+")
        head, sep, answer = response.rpartition("|")
        return bool(sep) and answer.isdigit() and int(answer) == int(a) + int(b) and answer == str(int(answer))

    def score(prompt: str, response: str) -> float:
        a, b = prompt[:-1].split("+")
        head, sep, answer = response.rpartition("|")
        return digit_score(str(int(a) + int(b)), answer if sep else "")

    # Response length: 5 per column (n = the longer operand), "|", the sum (n or n+1 digits), EOS.
    digits = f"{min_digits}" if min_digits == max_digits else f"{min_digits}-{max_digits}"
    return Task("add", f"add two {digits}-digit numbers with a column/carry scratchpad "
                       f"('47281+91536=' -> '1607;8301;2518;7108;4903;|138817')",
                DIGITS + "+=;|", sample, check, score, 5 * min_digits + min_digits + 2, 5 * max_digits + max_digits + 3)


TASKS: Dict[str, Callable[[], Task]] = {"sort": sort_task, "add": add_task}


def get_task(name: str) -> Task:
    """The registered task ``name`` (ValueError naming the choices otherwise)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]()
