"""The built-in task: multi-digit addition with a worked, digit-by-digit scratchpad.

    prompt    "0004721+0000093="            operands right-aligned to ``width`` digits
    response  "1+3+0=4;2+9+0=11;7+0+1=8;4+0+0=4;|4814"  then EOS

One step per digit of the longer operand, least significant first ("a+b+carry=sum;"), then "|" and
the answer. Responses run from 12 characters (1 digit) to ~9 * width + width + 2 characters, so with
1 to 7 digits the longest correct response is about 6x the shortest: the regime where Length-adaptive GAE
matters. The reward is exact match of the integer after the last "|".
"""

from __future__ import annotations

import random
from dataclasses import dataclass

VOCAB = list("0123456789+=;|")
PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass(frozen=True)
class Problem:
    uid: str
    a: int
    b: int

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


@dataclass(frozen=True)
class AdditionTask:
    min_digits: int = 1
    max_digits: int = 7

    @property
    def width(self) -> int:
        return self.max_digits

    def sample(self, rng: random.Random, uid: str) -> Problem:
        nd = rng.randint(self.min_digits, self.max_digits)
        a = rng.randint(10 ** (nd - 1) if nd > 1 else 0, 10**nd - 1)
        nb = rng.randint(1, nd)
        b = rng.randint(0, 10**nb - 1)
        if rng.random() < 0.5:
            a, b = b, a
        return Problem(uid, a, b)

    def problems(self, n: int, seed: int, prefix: str) -> list[Problem]:
        rng = random.Random(seed)
        return [self.sample(rng, f"{prefix}{i}") for i in range(n)]

    def prompt(self, p: Problem) -> str:
        return f"{p.a:0{self.width}d}+{p.b:0{self.width}d}="

    def solution(self, p: Problem) -> str:
        """The worked scratchpad and answer (no EOS)."""
        da, db = str(p.a)[::-1], str(p.b)[::-1]
        steps, carry = [], 0
        for k in range(max(len(da), len(db))):
            x = int(da[k]) if k < len(da) else 0
            y = int(db[k]) if k < len(db) else 0
            s = x + y + carry
            steps.append(f"{x}+{y}+{carry}={s};")
            carry = s // 10
        return "".join(steps) + "|" + p.answer


def parse_prompt(text: str) -> tuple[int, int]:
    """The operands of a prompt ``AdditionTask.prompt`` wrote ("0004721+0000093=" -> (4721, 93))."""
    a, b = text.rstrip("=").split("+")
    return int(a), int(b)


def extract_answer(response: str) -> str | None:
    """The integer after the last "|", or None when there is none."""
    if "|" not in response:
        return None
    tail = response.rsplit("|", 1)[1].strip()
    return tail if tail.isdigit() else None
