"""A real multiple-choice set from packaged data: chatterbot-corpus questions, four candidate replies each.

For every question of the corpus, the choices are its own corpus answer and three answers to other questions of
the same topic (fluent and on topic, so the model has to match the reply to the question, not just recognise
good English); the choice order is shuffled with a fixed seed. A question whose topic has fewer than three other
distinct answers takes the rest from other topics. Questions that appear twice keep their first answer.
"""

from __future__ import annotations

import random

from lmforge.data.chat import chatterbot_conversations


def chatterbot_mc(n_choices: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    by_topic: dict[str, list[tuple[str, str]]] = {}
    seen = set()
    for topic, turns in chatterbot_conversations():
        q, a = turns[0].strip(), turns[1].strip()
        if q.lower() in seen or not q or not a:
            continue
        seen.add(q.lower())
        by_topic.setdefault(topic, []).append((q, a))
    every = sorted({a for qa in by_topic.values() for _, a in qa})
    rows = []
    for _topic, qa in sorted(by_topic.items()):
        for q, a in qa:
            same = sorted({b for _, b in qa if b.lower() != a.lower()})
            rng.shuffle(same)
            wrong = same[: n_choices - 1]
            while len(wrong) < n_choices - 1:
                b = rng.choice(every)
                if b.lower() != a.lower() and b not in wrong:
                    wrong.append(b)
            choices = [a, *wrong]
            rng.shuffle(choices)
            rows.append({"question": q, "choices": choices, "answer": choices.index(a)})
    return rows
