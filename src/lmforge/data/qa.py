"""Extractive question answering data: SQuAD-format files, windowed features, span decoding, and a real QA set
built from the packaged Shakespeare.

SQuAD format: `{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text",
"answer_start"}]}]}]}]}`; JSONL with one `{"id", "context", "question", "answers"}` per line is read too.

Contexts longer than the model's window are cut into overlapping windows (`stride` tokens shared between
neighbours, question repeated in each); a window that does not hold the whole answer is trained to point at
[CLS]. At prediction time every window votes with its best span and the best-scoring span across windows wins.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.assets import corpus_files
from lmforge.config import check_number
from lmforge.errors import DataError
from lmforge.files import check_out_dir, write_json
from lmforge.tokenizer import Tokenizer


@dataclass
class QAExample:
    id: str
    context: str
    question: str
    answers: list[tuple[str, int]] = field(default_factory=list)  # (text, character offset in context)


# --------------------------------------------------------------------------------------------------------------
# files


def read_squad(path: str | Path) -> list[QAExample]:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; give a SQuAD-format JSON or JSONL file")
    if not path.is_file():
        raise DataError(f"QA data file not found: {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{path} is empty")
    out: list[QAExample] = []
    try:
        if path.suffix.lower() in (".jsonl", ".ndjson"):
            for i, ln in enumerate(text.splitlines()):
                if ln.strip():
                    r = json.loads(ln)
                    out.append(_example(r, r.get("context", ""), f"{path.name}:{i + 1}"))
        else:
            doc = json.loads(text)
            for art in doc["data"]:
                for para in art["paragraphs"]:
                    for qa in para["qas"]:
                        out.append(_example(qa, para["context"], qa.get("id", "")))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except KeyError as e:
        raise DataError(f"{path} is not in SQuAD format (missing {e}); expected data/paragraphs/qas") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise DataError(f"{path} is not in SQuAD format (a field has the wrong type: {e})") from None
    if not out:
        raise DataError(f"{path} holds no questions")
    return out


def _example(qa: dict, context: str, where: str) -> QAExample:
    answers = []
    raw = qa.get("answers", [])
    if isinstance(raw, dict):  # the datasets-library layout: {"text": [...], "answer_start": [...]}
        raw = [{"text": t, "answer_start": s} for t, s in zip(raw.get("text", []), raw.get("answer_start", []))]
    for a in raw:
        if not isinstance(a, dict):
            raise DataError(f"{where}: each answer must be an object with text and answer_start")
        t, s = a["text"], int(a["answer_start"])
        if context[s : s + len(t)] != t:
            raise DataError(f"{where}: answer {t!r} is not at character {s} of its context")
        answers.append((t, s))
    if not qa.get("question", "").strip() or not context.strip():
        raise DataError(f"{where}: empty question or context")
    return QAExample(str(qa.get("id", where)), context, qa["question"], answers)


def write_squad(examples: list[QAExample], path: str | Path, title: str = "") -> None:
    paras: dict[str, list] = {}
    for e in examples:
        paras.setdefault(e.context, []).append(
            {"id": e.id, "question": e.question, "answers": [{"text": t, "answer_start": s} for t, s in e.answers]}
        )
    write_json(
        path,
        {
            "version": "lmforge-1",
            "data": [{"title": title, "paragraphs": [{"context": c, "qas": q} for c, q in paras.items()]}],
        },
    )


# --------------------------------------------------------------------------------------------------------------
# features


@dataclass
class QAFeatures:
    """One row per window: token ids, type ids, the example it came from, and per-token context offsets."""

    ids: list[list[int]]
    types: list[list[int]]
    example: list[int]
    offsets: list[list[tuple[int, int] | None]]  # None for question / special tokens
    start: list[int]  # answer token positions (0 = [CLS]: no answer in this window)
    end: list[int]


def qa_features(examples: list[QAExample], tokenizer: Tokenizer, max_len: int = 384, stride: int = 128) -> QAFeatures:
    tok = tokenizer.tok
    # windows need room for the question, three specials and more context than the overlap (the Rust side
    # panics instead of raising otherwise)
    q_lens = [len(e.ids) for e in tok.encode_batch([e.question for e in examples], add_special_tokens=False)]
    longest = max(q_lens, default=0)
    if stride >= max_len - longest - 3:
        raise DataError(
            f"windows of {max_len} tokens leave {max_len - longest - 3} for the context next to the "
            f"longest question ({longest} tokens): use a stride below that, or a larger max_len"
        )
    tok.enable_truncation(max_len, stride=stride, strategy="only_second")
    try:
        encs = tok.encode_batch([(e.question, e.context) for e in examples], add_special_tokens=True)
    except Exception as e:  # the Rust side raises when the question alone fills the window
        raise DataError(f"a question is too long for max_len={max_len} with stride {stride} ({e})") from None
    finally:
        tok.no_truncation()
    f = QAFeatures([], [], [], [], [], [])
    for ei, (ex, enc) in enumerate(zip(examples, encs)):
        for w in [enc, *enc.overflowing]:
            seq = w.sequence_ids
            offs = [w.offsets[i] if seq[i] == 1 else None for i in range(len(w.ids))]
            s_tok = e_tok = 0
            if ex.answers:
                text, a0 = ex.answers[0]
                a1 = a0 + len(text)
                ctx = [i for i, o in enumerate(offs) if o is not None]
                if ctx and offs[ctx[0]][0] <= a0 and offs[ctx[-1]][1] >= a1:
                    s_tok = next(i for i in ctx if offs[i][1] > a0)
                    e_tok = next(i for i in reversed(ctx) if offs[i][0] < a1)
            f.ids.append(w.ids)
            f.types.append(w.type_ids)
            f.example.append(ei)
            f.offsets.append(offs)
            f.start.append(s_tok)
            f.end.append(e_tok)
    return f


def best_spans(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    feats: QAFeatures,
    rows: list[int],
    max_answer_tokens: int = 30,
) -> list[tuple[float, int, int]]:
    """For each window row: (score, char start, char end) of the best span inside the context, or
    (-inf, 0, 0) when the window has none."""
    out = []
    for r, s, e in zip(rows, start_logits, end_logits):
        offs = feats.offsets[r]
        ctx = torch.tensor([o is not None for o in offs[: s.numel()]] + [False] * (s.numel() - len(offs)))
        if not ctx.any():
            out.append((float("-inf"), 0, 0))
            continue
        s = s.masked_fill(~ctx, float("-inf"))
        e = e.masked_fill(~ctx, float("-inf"))
        scores = s[:, None] + e[None, :]
        T = s.numel()
        allowed = torch.ones(T, T, dtype=torch.bool).triu().tril(max_answer_tokens - 1)
        scores = scores.masked_fill(~allowed, float("-inf"))
        flat = int(scores.argmax())
        i, j = divmod(flat, T)
        out.append((float(scores[i, j]), offs[i][0], offs[j][1]))
    return out


# --------------------------------------------------------------------------------------------------------------
# a real QA set from the packaged Shakespeare

_SPEAKER = re.compile(r"^([A-Z][A-Z' .-]{1,30}[A-Z])\.$")


def _speeches(text: str) -> list[tuple[str, int, str, int]]:
    """(speaker, char offset of the heading, first line of the speech, its offset) for each speech."""
    out = []
    lines = text.split("\n")
    pos = 0
    offsets = []
    for ln in lines:
        offsets.append(pos)
        pos += len(ln) + 1
    for i, ln in enumerate(lines[:-1]):
        m = _SPEAKER.match(ln.strip())
        nxt = lines[i + 1].strip()
        if m and nxt and not _SPEAKER.match(nxt) and not nxt.startswith("["):
            out.append((m.group(1), offsets[i] + ln.index(m.group(1)), nxt, offsets[i + 1] + lines[i + 1].index(nxt)))
    return out


def write_shakespeare_qa(out: str | Path, n_per_play: int = 60, seed: int = 0) -> dict[str, int]:
    """`lmforge data shakespeare-qa`: the set written as out/train.json, dev.json, test.json (SQuAD format);
    returns the questions per split. An unusable `out` is refused before anything is built."""
    out = check_out_dir(out, "--out")
    splits = shakespeare_qa(n_per_play=n_per_play, seed=seed)
    for name, ex in splits.items():
        write_squad(ex, out / f"{name}.json", title=f"shakespeare-qa {name}")
    return {k: len(v) for k, v in splits.items()}


def shakespeare_qa(n_per_play: int = 60, context_speeches: int = 12, seed: int = 0) -> dict[str, list[QAExample]]:
    """Questions about passages of the plays, answered by a span of the passage:

        who:   'Who says "<first line of a speech>"?'              -> the speaker's name heading that speech
        reply: 'What does <B> answer when <A> says "<line>"?'      -> the first line of B's reply

    A passage is `context_speeches` consecutive speeches as printed (name line, then the text). Quoted lines
    are unique within their passage. Plays are split into train / dev / test by a hash of the file name, so no
    passage of a test play is seen in training (6 test plays, 4 validation plays, the rest for training).
    """
    check_number("--per-play", n_per_play, 1, integer=True)
    check_number("context_speeches", context_speeches, 1, integer=True)
    rng = random.Random(seed)
    splits: dict[str, list[QAExample]] = {"train": [], "dev": [], "test": []}
    plays = [(f, f.read_text(encoding="utf-8")) for f in corpus_files("shakespeare")]
    plays = [(f, t) for f, t in plays if len(_speeches(t)) >= context_speeches * 3]  # not the poems
    # plays in the order of a hash of their names: the first 6 are the test plays, the next 4 validation
    plays.sort(key=lambda ft: hashlib.sha1(ft[0].stem.encode()).hexdigest())
    for rank, (f, text) in enumerate(plays):
        sp = _speeches(text)
        split = "test" if rank < 6 else "dev" if rank < 10 else "train"
        made, drawn = 0, set()
        for _ in range(n_per_play * 4):
            if made >= n_per_play:
                break
            k = rng.randrange(0, len(sp) - context_speeches)
            j = rng.randrange(1, context_speeches - 1)
            if (k, j) in drawn:
                continue
            drawn.add((k, j))
            chunk = sp[k : k + context_speeches]
            c0 = chunk[0][1]
            c1 = sp[k + context_speeches][1] if k + context_speeches < len(sp) else len(text)
            context = text[c0:c1].strip()
            speaker, h_off, line, l_off = chunk[j]
            quote = line.rstrip(",;:-")
            if len(quote.split()) < 4 or context.count(quote) != 1:
                continue
            if rng.random() < 0.5:
                q = f'Who says "{quote}"?'
                ans = (speaker, h_off - c0)
            else:
                nxt_speaker, _, reply, r_off = chunk[j + 1]
                if nxt_speaker == speaker or len(reply.split()) < 2:
                    continue
                q = f'What does {nxt_speaker.title()} answer when {speaker.title()} says "{quote}"?'
                ans = (reply, r_off - c0)
            splits[split].append(QAExample(f"{f.stem}-{k}-{j}", context, q, [ans]))
            made += 1
    return splits
