"""Problems with checkable answers, for reinforcement learning from verifiable rewards (`lmforge finetune grpo`).

Format (JSONL, one problem per line):
    {"prompt": "..." or [messages], "answer": "42"}   plus any keys a verifier reads (`tests` for `code`)

`arith` is the built-in set: arithmetic word problems generated offline from a seed (one or two steps of
addition, subtraction and multiplication over small numbers, in a dozen everyday templates), each with its exact
whole-number answer and an instruction to end with it. A problem's split is a hash of its text, so the held-out
problems are never among the training ones, and the same seed gives the same sets on every machine.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.data.chat import Messages, _check_messages, _jsonl, write_jsonl
from lmforge.errors import DataError


@dataclass
class Problem:
    prompt: Messages  # the conversation so far, ending with a user turn
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)  # other keys of the row (a verifier may read them)

    def row(self) -> dict[str, Any]:
        """The problem as the JSONL row it was read from."""
        p = self.prompt[0]["content"] if len(self.prompt) == 1 else self.prompt
        return {"prompt": p, "answer": self.answer, **self.extra}


def read_problems(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file of {"prompt", "answer", ...} rows."""
    out = []
    for i, row in _jsonl(path):
        if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
            raise DataError(f"{path}:{i}: each row needs prompt and answer")
        p = row["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else _check_messages(p, f"{path}:{i}")
        if msgs[-1]["role"] != "user":
            raise DataError(f"{path}:{i}: the prompt must end with a user turn")
        a = row["answer"]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise DataError(f"{path}:{i}: answer must be a string or a number, got {a!r}")
        out.append(Problem(msgs, str(a), {k: v for k, v in row.items() if k not in ("prompt", "answer")}))
    if not out:
        raise DataError(f"{path}: no problems (expected JSONL rows with prompt and answer)")
    return out


# --------------------------------------------------------------------------------------------------------------
# the built-in set

INSTRUCTION = "Answer with the final number only."
NAMES = ("Tom", "Anna", "Ben", "Sara", "Leo", "Mia", "Sam", "Lily", "Max", "Emma", "Jack", "Zoe")
THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "coins", "cards", "stamps", "shells")

# (template, answer) pairs; {n} a name, {t} a thing, a / b / c the numbers drawn for it
ONE_STEP = (
    ("{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?", lambda a, b, c: a + b),
    ("{n} had {a} {t} and gave {b} of them away. How many {t} does {n} have left?", lambda a, b, c: a - b),
    ("There are {a} {t} in a box and {b} {t} on the table. How many {t} are there in all?", lambda a, b, c: a + b),
    ("{n} buys {a} bags with {b} {t} in each bag. How many {t} does {n} buy?", lambda a, b, c: a * b),
    ("A shelf holds {a} {t}. {b} {t} are taken off the shelf. How many {t} are still on it?", lambda a, b, c: a - b),
    ("What is {a} plus {b}?", lambda a, b, c: a + b),
    ("What is {a} minus {b}?", lambda a, b, c: a - b),
    ("What is {a} times {b}?", lambda a, b, c: a * b),
)
TWO_STEP = (
    ("{n} has {a} {t}, finds {b} more and then loses {c}. How many {t} does {n} have now?", lambda a, b, c: a + b - c),
    (
        "{n} has {a} {t}. A friend gives {n} {b} and another friend gives {n} {c}. How many {t} does {n} have?",
        lambda a, b, c: a + b + c,
    ),
    (
        "There are {a} boxes with {b} {t} in each, and {c} more {t} on the floor. How many {t} are there?",
        lambda a, b, c: a * b + c,
    ),
)


def _numbers(rng: random.Random, template: str) -> tuple[int, int, int]:
    if "times" in template or "in each" in template:  # a product: small factors
        return rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
    a = rng.randint(5, 30)
    b = (
        rng.randint(1, a - 1)
        if ("away" in template or "minus" in template or "taken" in template)
        else rng.randint(1, 20)
    )
    c = rng.randint(1, min(a + b - 1, 15)) if "loses" in template else rng.randint(1, 15)
    return a, b, c


def arith_problems(n: int, seed: int = 0, two_step: float = 0.3) -> list[Problem]:
    """n distinct problems (a share `two_step` of them two-step), in the order drawn."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for _ in range(50 * n):  # (draws repeat rarely; the bound only guards against an exhausted space)
        if len(out) == n:
            break
        template, answer = rng.choice(TWO_STEP if rng.random() < two_step else ONE_STEP)
        a, b, c = _numbers(rng, template)
        text = template.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b, c=c)
        if text in seen:
            continue
        seen.add(text)
        out.append(Problem([{"role": "user", "content": f"{text} {INSTRUCTION}"}], str(answer(a, b, c))))
    return out


def held_out(text: str, seed: int, share: float) -> bool:
    """Whether a problem's text falls in the held-out share under this seed (a hash: no list to keep)."""
    h = int(hashlib.sha256(f"arith:{seed}:{text}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return h < share


HELD_OUT = 0.2  # the share of problem texts that are never trained on (fixed: a larger set keeps every split)


def arith_splits(seed: int = 0, train: int = 2000, val: int = 100, test: int = 300) -> dict[str, list[Problem]]:
    """train / val / test problems of the built-in set: drawn from one seeded stream and split by a hash of their
    text (held-out problems share no text with training ones, whatever sizes are asked for); val and test divide
    the held-out ones, val first."""
    pool = arith_problems(int(max(train / (1 - HELD_OUT), (val + test) / HELD_OUT) * 1.3) + 200, seed)
    splits: dict[str, list[Problem]] = {"train": [], "val": [], "test": []}
    for p in pool:
        if held_out(p.prompt[-1]["content"], seed, HELD_OUT):
            part = "val" if len(splits["val"]) < val else "test"
        else:
            part = "train"
        if len(splits[part]) < {"train": train, "val": val, "test": test}[part]:
            splits[part].append(p)
    for k, limit in (("train", train), ("val", val), ("test", test)):
        if len(splits[k]) < limit:
            raise DataError(f"the arithmetic set holds fewer than {limit} {k} problems; ask for fewer")
    return splits


def write_arith(out: str | Path, seed: int = 0, **sizes: int) -> dict[str, int]:
    """The built-in set as out/train.jsonl, val.jsonl, test.jsonl (rows of prompt and answer); returns counts."""
    splits = arith_splits(seed, **sizes)
    for name, rows in splits.items():
        write_jsonl([p.row() for p in rows], Path(out) / f"{name}.jsonl")
    return {k: len(v) for k, v in splits.items()}
