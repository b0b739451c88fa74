"""Chat data for instruction tuning (SFT) and preference pairs for DPO.

Formats (JSONL, one example per line):
    chat     {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
             ({"prompt": ..., "completion": ...} and {"instruction": ..., "output": ...} rows are read as one
             user turn and one assistant turn)
    pairs    {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}

Tokenization renders the model's own chat template and trains on assistant turns only: the tokens of each
assistant message (with the template's end-of-turn marker, so the model learns to stop) carry labels; system
and user tokens and the template's scaffolding are -100. Short examples are packed into rows of up to max_len
tokens; each keeps its own positions and attends only to itself (segment ids in the attention mask).

`chatterbot_chat` / `chatterbot_pairs` build both from the packaged chatterbot-corpus (2,026 English
conversations, 20 topics), split by question so that a held-out question is never seen in training.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from lmforge.errors import DataError, LmforgeError
from lmforge.files import check_out_dir, write_text

T = TypeVar("T")

# --- the chat template: the model's own (tokenizer_config.json's `chat_template`, or a GGUF's
# `tokenizer.chat_template`), rendered as transformers does, in Jinja's sandbox (a model file cannot reach Python
# through it); a model without one gets ChatML. Training data and generation render through the same function.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise LmforgeError(f"chat template: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:  # (Llama 3.x and SmolLM3 templates date their system prompt)
        return datetime.now().strftime(fmt)

    # what templates written for transformers use: break / continue, tojson with its keywords, today's date
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise LmforgeError(f"the model's chat template does not parse: {e}") from None


def apply_chat_template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LmforgeError(f"a chat message needs role ({', '.join(ROLES)}) and string content, got {m!r}")
    from jinja2.exceptions import TemplateError

    template = _compile(tokenizer.chat_template or CHATML)
    try:
        return template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=tokenizer.bos_token or "",
            eos_token=tokenizer.eos_token or "",
        )
    except TemplateError as e:
        raise LmforgeError(f"the model's chat template failed on these messages: {e}") from None


Messages = list[dict[str, str]]


@dataclass
class Pair:
    prompt: Messages  # the conversation so far, ending with a user turn
    chosen: str
    rejected: str


# --------------------------------------------------------------------------------------------------------------
# reading


def _jsonl(path: str | Path) -> list[tuple[int, Any]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist (expected a JSONL file)")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    return rows


def _as_messages(row: Any) -> Messages | None:
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        return row["messages"]
    if isinstance(row, dict):
        for q, a in (("prompt", "completion"), ("instruction", "output"), ("question", "answer")):
            if isinstance(row.get(q), str) and isinstance(row.get(a), str):
                return [{"role": "user", "content": row[q]}, {"role": "assistant", "content": row[a]}]
    return None


def _check_messages(msgs: Any, where: str) -> Messages:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: `messages` must be a non-empty list")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role ({', '.join(ROLES)}) and string content, got {m!r}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_chat(path: str | Path) -> list[Messages]:
    """Conversations from a chat JSONL file. Rows without an assistant turn train nothing: they are skipped and
    counted in a warning; a file with none left is an error."""
    out, skipped = [], 0
    for i, row in _jsonl(path):
        msgs = _as_messages(row)
        if msgs is None:
            raise DataError(f'{path}:{i}: expected {{"messages": [...]}} (or prompt/completion) in each row')
        msgs = _check_messages(msgs, f"{path}:{i}")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            skipped += 1
            continue
        out.append(msgs)
    if not out:  # the error alone: a warning about skipped rows would only repeat it
        raise DataError(f"{path}: no conversation has an assistant turn; SFT trains on assistant replies")
    if skipped:
        print(f"warning: {path}: {skipped} conversation(s) without an assistant turn skipped", file=sys.stderr)
    return out


def read_pairs(path: str | Path) -> list[Pair]:
    """Preference pairs. A pair whose chosen and rejected replies are the same teaches nothing: skipped and
    counted; a file with none left is an error."""
    out, same = [], 0
    for i, row in _jsonl(path):
        if not isinstance(row, dict) or not all(k in row for k in ("prompt", "chosen", "rejected")):
            raise DataError(f"{path}:{i}: each row needs prompt, chosen and rejected")
        prompt = row["prompt"]
        msgs = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _check_messages(prompt, f"{path}:{i}")
        )
        chosen, rejected = row["chosen"], row["rejected"]
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            raise DataError(f"{path}:{i}: chosen and rejected must be strings (the assistant's reply)")
        if chosen.strip() == rejected.strip():
            same += 1
            continue
        out.append(Pair(msgs, chosen, rejected))
    if not out:
        raise DataError(f"{path}: no usable preference pair (chosen must differ from rejected)")
    if same:
        print(f"warning: {path}: {same} pair(s) with chosen == rejected skipped", file=sys.stderr)
    return out


def write_jsonl(rows: Sequence[Any], path: str | Path) -> Path:
    def plain(r):  # a Pair, a conversation (list of messages) or a ready row
        return r.__dict__ if isinstance(r, Pair) else {"messages": r} if isinstance(r, list) else r

    return write_text(Path(path), "".join(json.dumps(plain(r), ensure_ascii=False) + "\n" for r in rows))


# --------------------------------------------------------------------------------------------------------------
# the packaged corpus


def chatterbot_conversations(language: str = "english") -> list[tuple[str, list[str]]]:
    """(topic, turns) for every conversation of the packaged chatterbot-corpus; turns alternate user/assistant."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "chatterbot-corpus is not installed: pip install --no-deps chatterbot-corpus==1.3.3 "
            "(make quickstart / make test install it)"
        )
    root = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    files = sorted(root.glob("*.yml"))
    if not files:
        raise DataError(f"chatterbot-corpus has no {language!r} data under {root}")
    out = []
    for f in files:
        data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append((f.stem, turns))
    return out


def _split_of(question: str, seed: int, test: float, val: float) -> str:
    h = int(hashlib.sha256(f"{seed}:{question.strip().lower()}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test else "val" if h < test + val else "train"


def held_out_splits(
    data: str | Path,
    val_data: str | Path | None,
    test_data: str | Path | None,
    seed: int,
    read: Callable[[str | Path], list[T]],
    key: Callable[[T], str],
    what: str,
    builtin: tuple[str, Callable[[int], dict[str, list[T]]]] | None = None,
) -> tuple[list[T], list[T], list[T]]:
    """(train, val, test) rows of a decoder task: `builtin`'s own splits when `data` is its name (e.g.
    chatterbot), else the rows of read(data) split by a hash of key(row) under the seed (a question asked twice
    lands in one split; 10% test and 5% validation, none where --test-data / --val-data are given), those files
    then read as the held-out splits. An empty split is one line naming the flag that would fill it."""
    if builtin is not None and str(data) == builtin[0]:
        s = builtin[1](seed)
        train, val, test = s["train"], s["val"], s["test"]
    else:
        train, val, test = [], [], []
        for row in read(data):
            split = _split_of(key(row), seed, 0.0 if test_data else 0.1, 0.0 if val_data else 0.05)
            (test if split == "test" else val if split == "val" else train).append(row)
    if val_data:
        val = read(val_data)
    if test_data:
        test = read(test_data)
    for part, name, flag in (
        (train, "training", "--data"),
        (val, "validation", "--val-data"),
        (test, "test", "--test-data"),
    ):
        if not part:
            raise DataError(f"the {name} split has no {what}: give more data or {flag}")
    return train, val, test


def write_chatterbot(out: str | Path, pairs: bool = False, seed: int = 0) -> dict[str, int]:
    """`lmforge data chatterbot`: conversations (or, with pairs, DPO preference pairs) written as
    out/train.jsonl, val.jsonl, test.jsonl; returns the rows per split. An unusable `out` is refused first."""
    out = check_out_dir(out, "--out")
    splits = chatterbot_pairs(seed=seed) if pairs else chatterbot_chat(seed=seed)
    for name, rows in splits.items():
        write_jsonl(rows, out / f"{name}.jsonl")
    return {k: len(v) for k, v in splits.items()}


def chatterbot_chat(seed: int = 0, test: float = 0.1, val: float = 0.05) -> dict[str, list[Messages]]:
    """train / val / test conversations, split by the first question (a question asked twice lands in one
    split)."""
    splits: dict[str, list[Messages]] = {"train": [], "val": [], "test": []}
    for _, turns in chatterbot_conversations():
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
        if msgs[-1]["role"] == "user":
            msgs = msgs[:-1]
        splits[_split_of(turns[0], seed, test, val)].append(msgs)
    return splits


def chatterbot_pairs(seed: int = 0, test: float = 0.1, val: float = 0.05) -> dict[str, list[Pair]]:
    """Preference pairs from the corpus: for each question the corpus answer is chosen, and the answer to a
    different question of the same topic is rejected (fluent, on-topic, but not an answer to this question).
    The same question split as chatterbot_chat."""
    rng = random.Random(seed)
    by_topic: dict[str, list[tuple[str, str]]] = {}
    for topic, turns in chatterbot_conversations():
        by_topic.setdefault(topic, []).append((turns[0], turns[1]))
    splits: dict[str, list[Pair]] = {"train": [], "val": [], "test": []}
    for _topic, qa in sorted(by_topic.items()):
        for q, a in qa:
            others = [b for p, b in qa if p != q and b.strip().lower() != a.strip().lower()]
            if not others:
                continue
            splits[_split_of(q, seed, test, val)].append(Pair([{"role": "user", "content": q}], a, rng.choice(others)))
    return splits


# --------------------------------------------------------------------------------------------------------------
# tokenization


def tokenize_chat(tokenizer, messages: Messages, max_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (assistant tokens only; -100 elsewhere), truncated to max_len. None when truncation
    leaves no assistant token. Labels are aligned with the inputs (label[i] is the target at position i, i.e.
    already shifted: the next token)."""
    text = apply_chat_template(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = apply_chat_template(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = apply_chat_template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise DataError(
                "the model's chat template does not render conversations incrementally; "
                "assistant-only labels need a prefix-stable template"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer.tok.encode(text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    target = [any(s <= start < e for s, e in spans) for start, _ in offsets]
    ids, target = ids[: max_len + 1], target[: max_len + 1]
    labels = [ids[j + 1] if target[j + 1] else -100 for j in range(len(ids) - 1)]
    if all(x == -100 for x in labels):
        return None
    return ids[:-1], labels


def pack(examples: Sequence[tuple[list[int], list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy first-fit packing, longest first: rows of input_ids, labels, segment (1, 2, ... per example, 0 =
    padding) and position ids that restart in each example."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[dict[str, list[int]]] = []
    for i in order:
        ids, labels = examples[i]
        for r in rows:
            if len(r["input_ids"]) + len(ids) <= max_len:
                break
        else:
            r = {"input_ids": [], "labels": [], "segment": [], "position_ids": []}
            rows.append(r)
        seg = (r["segment"][-1] if r["segment"] else 0) + 1
        r["input_ids"] += ids
        r["labels"] += labels
        r["segment"] += [seg] * len(ids)
        r["position_ids"] += list(range(len(ids)))
    return rows
