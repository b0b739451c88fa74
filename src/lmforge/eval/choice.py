"""Zero-shot multiple choice by log-likelihood, the way evaluation harnesses score language models.

Each row is {"question": str, "choices": [str, ...], "answer": index or the correct choice's text}. Every choice
is scored as a continuation of the question prompt: the sum of the log-probabilities of its tokens. The model's
pick is the choice with the highest sum (`accuracy`), or with the highest sum per character of the choice
(`accuracy_norm`, which removes the bias towards short answers). With `chat=True` the question goes through the
model's chat template as a user turn and each choice is scored as the assistant's reply.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmforge.data.chat import apply_chat_template
from lmforge.data.choice import chatterbot_mc
from lmforge.errors import DataError

PROMPT = "Question: {question}\nAnswer:"


def read_choices(path: str | Path) -> list[dict]:
    """Rows of a multiple-choice JSONL file, checked; a packaged set by name (chatterbot-mc) also works."""
    if str(path) == "chatterbot-mc":
        return chatterbot_mc()
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p} is a folder; give a JSONL file of question / choices / answer rows")
    if not p.is_file():
        raise DataError(f"{p} does not exist (a JSONL file of question / choices / answer rows, or chatterbot-mc)")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        choices = row.get("choices") if isinstance(row, dict) else None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise DataError(
                f"{p}:{n}: a row needs a string 'question' and a list of at least two non-empty string 'choices'"
            )
        ans = row.get("answer")
        if isinstance(ans, str) and ans in choices:
            ans = choices.index(ans)
        if not isinstance(ans, int) or isinstance(ans, bool) or not 0 <= ans < len(choices):
            raise DataError(f"{p}:{n}: 'answer' must be a choice index (0..{len(choices) - 1}) or one of the choices")
        rows.append({"question": row["question"], "choices": choices, "answer": ans})
    if not rows:
        raise DataError(f"{p} has no rows")
    return rows


@torch.inference_mode()
def choice_logprobs(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | context) for each choice, all choices in one padded batch."""
    ctx = tokenizer.encode(context)
    if not ctx:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        ctx = [start if start is not None else 0]
    conts = [tokenizer.encode(c) for c in choices]
    ctx_len = model.config.max_seq_len - max(len(c) for c in conts)
    if ctx_len < 1:
        raise DataError("a choice is longer than the model's context")
    ctx = ctx[-ctx_len:]  # keep the end of an over-long question (nearest the answer)
    rows = [ctx + c for c in conts]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    logp = torch.log_softmax(model(ids).logits.float(), dim=-1)  # right padding: causal rows never see it
    out = []
    for i, c in enumerate(conts):
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c))
        out.append(float(logp[i, pos, torch.tensor(c)].sum()))
    return out


def evaluate_choices(
    model, tokenizer, rows: list[dict], chat: bool = False, template: str | None = None, progress: bool = True
) -> dict:
    """accuracy, accuracy_norm and per-row picks for multiple-choice rows. template: the text around each
    question (default PROMPT; under chat, the user turn's text, by default the question alone)."""
    from tqdm import tqdm

    if template is not None and "{question}" not in template:
        raise DataError("the prompt template needs a {question} placeholder")
    model.eval()
    hits = hits_norm = 0
    details = []
    for row in tqdm(rows, desc="multiple choice", disable=not progress, leave=False):
        if chat:
            turn = template.format(question=row["question"]) if template else row["question"]
            context = apply_chat_template(tokenizer, [{"role": "user", "content": turn}])
            choices = list(row["choices"])
        else:
            context = (template or PROMPT).format(question=row["question"])
            choices = [" " + c.lstrip() for c in row["choices"]]
        scores = choice_logprobs(model, tokenizer, context, choices)
        norm = [s / max(len(c.strip()), 1) for s, c in zip(scores, row["choices"])]
        pick, pick_norm = int(torch.tensor(scores).argmax()), int(torch.tensor(norm).argmax())
        hits += pick == row["answer"]
        hits_norm += pick_norm == row["answer"]
        details.append({"answer": row["answer"], "pick": pick, "pick_norm": pick_norm, "logprobs": scores})
    n = len(rows)
    chance = sum(1 / len(r["choices"]) for r in rows) / n
    return {"accuracy": hits / n, "accuracy_norm": hits_norm / n, "chance": chance, "n": n, "rows": details}
