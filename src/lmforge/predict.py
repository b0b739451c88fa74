"""Batched encoder inference: class probabilities, labels and sentence embeddings for lists of texts, and answer
spans for questions.

Texts are tokenized once, sorted by length and cut into batches, so each batch pads only to its own longest
text (real tweets vary from 5 to 100 tokens: padding everything to the longest wastes most of the compute);
results come back in the caller's order.

A classifier reads all of a text longer than its window: the text is cut into overlapping windows of max_len
tokens (neighbours share `stride`, a quarter of the window by default), each window is scored, and the text's
logits are the mean of its windows' (as `lmforge finetune classify` trains them). Embeddings keep the model's
own recipe: the first window only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from lmforge.config import check_number
from lmforge.data.labelled import input_texts
from lmforge.data.qa import QAExample, best_spans, qa_features
from lmforge.errors import ModelLoadError
from lmforge.interop import load_pretrained
from lmforge.models.encoder import Encoder, mean_pool
from lmforge.runtime import tune_allocator
from lmforge.tokenizer import Tokenizer


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, types: Sequence[Sequence[int]] | None = None
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask (and token_type_ids) tensors for a list of id lists."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        out["token_type_ids"] = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
        if types is not None:
            out["token_type_ids"][i, : len(s)] = torch.tensor(types[i], dtype=torch.long)
    return out


def pad_windows(docs: Sequence[Sequence[Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask [D, W, T] for D texts of up to W windows each: a text with fewer windows has
    all-padding rows after its own (their mask is 0 throughout, so `window_logits` skips them)."""
    W, T = max(len(d) for d in docs), max(len(w) for d in docs for w in d)
    ids = torch.full((len(docs), W, T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(docs), W, T), dtype=torch.long)
    for i, d in enumerate(docs):
        for j, w in enumerate(d):
            ids[i, j, : len(w)] = torch.tensor(w, dtype=torch.long)
            mask[i, j, : len(w)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def window_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], grad_checkpoint: bool = False
) -> torch.Tensor:
    """A classifier's logits per text [D, labels]: for a [D, T] batch the model's own, for a [D, W, T] batch of
    windows (pad_windows) the mean over each text's real windows, every window run once in one pass."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.dim() == 2:
        return model(ids, attention_mask=mask, grad_checkpoint=grad_checkpoint).logits
    real = mask[:, :, 0].bool()  # [D, W]: a window holds [CLS] first
    logits = model(ids[real], attention_mask=mask[real], grad_checkpoint=grad_checkpoint).logits
    full = logits.new_zeros(*real.shape, logits.size(-1))
    full[real] = logits
    return full.sum(1) / real.sum(1, keepdim=True).to(logits.dtype)


def window_stride(max_len: int) -> int:
    """Tokens neighbouring windows share by default: a quarter of the window (so every token sits at least an
    eighth of a window from an edge in one of them)."""
    return max_len // 4


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int | None = None) -> Iterator[list[int]]:
    """Index batches in order of length (longest first, so a memory problem shows at once); with max_tokens a
    batch also stops growing when batch x longest would exceed it."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or (max_tokens and (len(batch) + 1) * lengths[batch[0]] > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def check_batch(batch_size: int, max_len: int | None = None) -> None:
    """Refuse a batch size below 1 (or a max_len below 1) before any work; the CLI calls it before loading."""
    check_number("--batch-size", batch_size, 1, integer=True)
    check_number("--max-len", max_len, 1, integer=True)


def _check_encoder(model: torch.nn.Module) -> Encoder:
    if not isinstance(model, Encoder):
        raise ModelLoadError(f"this needs an encoder model (BERT family), got a {type(model).__name__}")
    return model


@torch.inference_mode()
def encode(
    model: Encoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_len: int | None = None,
    what: str = "logits",
    windows: bool = False,
    stride: int | None = None,
) -> torch.Tensor:
    """Run the encoder over texts in length-sorted batches. what: "logits" (the head's output per text),
    "mean" (mean-pooled hidden states), "cls" (the [CLS] hidden state) or "pooled" (the pooler's output).
    windows: a text longer than max_len is read whole as overlapping windows (neighbours sharing `stride` tokens)
    and gets the mean of their outputs; otherwise it is truncated to max_len."""
    check_batch(batch_size, max_len)
    model = _check_encoder(model)
    tune_allocator()  # keep freed activation buffers in the process, as training does (see lmforge.runtime)
    was_training = model.training
    model.eval()
    max_len = min(max_len or model.config.max_seq_len, model.config.max_seq_len)
    if windows:
        per_text = tokenizer.encode_windows(texts, max_len, window_stride(max_len) if stride is None else stride)
    else:
        per_text = [[e.ids] for e in tokenizer.encode_for_encoder(texts, max_len=max_len)]
    rows = [w for ws in per_text for w in ws]
    owner = torch.tensor([i for i, ws in enumerate(per_text) for _ in ws])
    device = model.pos_emb.weight.device  # (the word embedding may be quantized)
    out: list[torch.Tensor | None] = [None] * len(rows)
    # (oneDNN-prepacked weights, which speed up decoding, measured 6% slower here: 64 x 128-token batches)
    for idx in length_batches([len(r) for r in rows], batch_size):
        b = pad_batch([rows[i] for i in idx], tokenizer.pad_id)
        b = {k: v.to(device) for k, v in b.items()}
        o = model(**b, heads=what == "logits")
        if what == "logits":
            r = o.logits
        elif what == "mean":
            r = mean_pool(o.hidden, b["attention_mask"])
        elif what == "cls":
            r = o.hidden[:, 0]
        else:
            r = o.pooled
        for j, i in enumerate(idx):
            out[i] = r[j].float().cpu()
    if was_training:
        model.train()
    per_row = torch.stack(out)  # type: ignore[arg-type]
    if len(rows) == len(texts):  # one window each
        return per_row
    total = torch.zeros(len(texts), per_row.size(-1)).index_add_(0, owner, per_row)
    return total / torch.bincount(owner, minlength=len(texts)).unsqueeze(-1)


def predict(
    model: Encoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_len: int | None = None,
    stride: int | None = None,
) -> list[dict]:
    """Label, probability and all class probabilities for each text, from a classification model (a text longer
    than max_len, by default the model's window, is read whole in overlapping windows)."""
    model = _check_encoder(model)
    if model.config.head != "classify":
        raise ModelLoadError(
            "this model has no classification head; fine-tune one with `lmforge finetune classify` first"
        )
    probs = predict_proba(model, tokenizer, texts, batch_size, max_len, stride)
    labels = model.config.labels
    return [
        {
            "label": labels[int(p.argmax())],
            "score": float(p.max()),
            "probs": {labels[k]: float(v) for k, v in enumerate(p)},
        }
        for p in probs
    ]


def predict_proba(
    model: Encoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_len: int | None = None,
    stride: int | None = None,
) -> torch.Tensor:
    """Class probabilities [N, labels]: the softmax of each text's logits, the mean over its windows."""
    logits = encode(model, tokenizer, texts, batch_size, max_len, "logits", windows=True, stride=stride)
    return torch.softmax(logits, dim=-1)


def embed(
    model: Encoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_len: int | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Sentence embeddings [N, d]: mean over real tokens of the last hidden states, L2-normalised (the
    sentence-transformers recipe all-MiniLM-L6-v2 was trained with)."""
    e = encode(model, tokenizer, texts, batch_size, max_len, "mean")
    return F.normalize(e, dim=-1) if normalize else e


def embed_file(
    model_path: str,
    path: str | None = None,
    texts: list[str] | None = None,
    text_col: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    quantize: str | None = None,
    dtype: str | None = None,
) -> tuple[list[str], torch.Tensor]:
    """`lmforge embed`: (texts, their embeddings [N, d]) for the texts of `path` (a .txt file, CSV/TSV/JSONL with
    `text_col`, or - for standard input) or `texts`, under the encoder at `model_path`. The batch size and the
    input are checked before the model loads."""
    check_batch(batch_size)
    texts = input_texts(path, texts, text_col)
    model, tok = load_pretrained(model_path, device=device, quantize=quantize, dtype=dtype)
    return texts, embed(model, tok, texts, batch_size=batch_size)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] cosine similarities between the rows of a [N, d] and b [M, d]."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


VOTES = ("mean", "majority")


def predict_ensemble(
    members: Sequence[tuple[Encoder, Tokenizer]], texts: Sequence[str], vote: str = "mean", batch_size: int = 64
) -> list[dict]:
    """Combine several classifiers with the same label names (in any order): `mean` averages their class
    probabilities; `majority` takes the label most members predict (ties go to the higher mean probability).
    `probs` are the mean probabilities either way; `votes` counts each label's votes."""
    if vote not in VOTES:
        raise ModelLoadError(f"--vote must be one of {', '.join(VOTES)}, got {vote!r}")
    check_batch(batch_size)
    if not members:
        raise ModelLoadError("an ensemble needs at least one model")
    labels = list(members[0][0].config.labels)
    total = torch.zeros(len(texts), len(labels))
    votes = torch.zeros(len(texts), len(labels))
    for model, tok in members:
        model = _check_encoder(model)
        if model.config.head != "classify":
            raise ModelLoadError("every ensemble member must be a classifier (lmforge finetune classify)")
        if sorted(model.config.labels) != sorted(labels):
            raise ModelLoadError(
                f"ensemble members must share their labels: {', '.join(model.config.labels)} vs {', '.join(labels)}"
            )
        order = [model.config.labels.index(name) for name in labels]  # this member's columns in our order
        p = predict_proba(model, tok, texts, batch_size)[:, order]
        total += p
        votes[torch.arange(len(texts)), p.argmax(-1)] += 1
    mean = total / len(members)
    pick = mean.argmax(-1) if vote == "mean" else (votes + mean * 1e-3).argmax(-1)  # mean prob breaks ties
    return [
        {
            "label": labels[int(k)],
            "score": float(mean[i, k]),
            "probs": {labels[j]: float(v) for j, v in enumerate(mean[i])},
            "votes": {labels[j]: int(v) for j, v in enumerate(votes[i])},
        }
        for i, k in enumerate(pick.tolist())
    ]


@torch.inference_mode()
def answer(
    model: Encoder,
    tokenizer: Tokenizer,
    examples: list[QAExample],
    max_len: int = 384,
    stride: int = 128,
    batch_size: int = 32,
    max_answer_tokens: int = 30,
) -> list[str]:
    """The best answer span in each example's context (windows over long contexts), for an encoder with a QA head."""
    if not isinstance(model, Encoder) or model.config.head != "qa":
        raise ModelLoadError("this model has no question-answering head; fine-tune one with `lmforge finetune qa`")
    model.eval()
    feats = qa_features(examples, tokenizer, min(max_len, model.config.max_seq_len), stride)
    best: list[tuple[float, int, int]] = [(float("-inf"), 0, 0)] * len(examples)
    device = model.pos_emb.weight.device  # (the word embedding may be quantized)
    for rows in length_batches([len(x) for x in feats.ids], batch_size):
        b = pad_batch([feats.ids[r] for r in rows], tokenizer.pad_id, [feats.types[r] for r in rows])
        logits = model(**{k: v.to(device) for k, v in b.items()}).logits.float().cpu()
        for r, span in zip(rows, best_spans(logits[..., 0], logits[..., 1], feats, rows, max_answer_tokens)):
            ei = feats.example[r]
            if span[0] > best[ei][0]:
                best[ei] = span
    return [ex.context[s:e] for ex, (_, s, e) in zip(examples, best)]
