"""Preference tuning with DPO (Rafailov et al., 2023), read top to bottom.

data     (prompt, chosen, rejected) JSONL, or `chatterbot`: the corpus answer is chosen, the answer to another
         question of the same topic rejected (see lmforge.data.chat.chatterbot_pairs)
tokens   prompt + reply through the chat template; only the reply's tokens are scored
model    the method's transform (full / top-k / lora / qlora); the reference model is the starting model:
         under LoRA the same weights with the adapters switched off, so no second copy is held (full and
         top-k keep a frozen copy). Reference log-probabilities are computed for each batch as it is used
         (a run of a fraction of an epoch pays for no more), and once for the held-out pairs
loss     -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))
finish   on the held-out pairs before and after: preference accuracy (the share of pairs whose chosen
         reply gets the higher mean per-token log-probability), and after: reward accuracy and mean reward
         margin beta * (...) (both are 0 before training by definition); model + adapter + report.
         Held-out figures are means over distinct prompts (each prompt's pairs averaged first), so a prompt
         that comes with a hundred answers counts once, as the SFT evaluation counts it
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.config import FinetuneConfig
from lmforge.data.chat import Pair, chatterbot_pairs, held_out_splits, read_pairs, tokenize_chat
from lmforge.errors import DataError
from lmforge.models.decoder import DecoderLM
from lmforge.nn.lora import lora_disabled, lora_modules
from lmforge.tune.driver import Run, Task, run_footer, run_task, say
from lmforge.tune.tasks import DPOArgs, task_max_len


@dataclass
class DPOResult:
    run_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    before: dict[str, float]
    after: dict[str, float]
    val: dict[str, float]
    trainable_params: int
    seconds: float
    peak_train_memory_mb: float
    rows: dict[str, int]

    def summary(self) -> str:
        """What `lmforge finetune dpo` prints at the end."""
        return (
            f"held-out preference accuracy: before {self.before['preference_accuracy']:.3f}  after "
            f"{self.after['preference_accuracy']:.3f}; reward accuracy {self.after['reward_accuracy']:.3f}, "
            f"margin {self.after['reward_margin']:.3f} ({self.seconds:.0f} s training)\n" + run_footer(self)
        )


Tokenized = tuple[list[int], list[int]]


def load_pair_splits(
    data: str | Path, val_data: str | Path | None, test_data: str | Path | None, seed: int
) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """Preference pairs split by their prompt's last turn (`chatterbot`: pairs of the packaged corpus)."""
    return held_out_splits(
        data,
        val_data,
        test_data,
        seed,
        read_pairs,
        lambda p: p.prompt[-1]["content"],
        "preference pairs",
        ("chatterbot", chatterbot_pairs),
    )


def tokenize_pairs(tok, pairs: list[Pair], max_len: int) -> tuple[list[tuple[Tokenized, Tokenized]], list[str]]:
    """Token ids and labels of each pair's chosen and rejected conversation, and each kept pair's prompt (the
    group it is scored in); pairs whose reply truncation leaves no token are dropped."""
    out, prompts = [], []
    for p in pairs:
        c = tokenize_chat(tok, p.prompt + [{"role": "assistant", "content": p.chosen}], max_len)
        r = tokenize_chat(tok, p.prompt + [{"role": "assistant", "content": p.rejected}], max_len)
        if c is not None and r is not None:
            out.append((c, r))
            prompts.append(json.dumps(p.prompt, sort_keys=True))
    return out, prompts


def group_mean(values: torch.Tensor, groups: list[str] | None) -> float:
    """Mean of per-group means: every distinct group (prompt) weighs the same however many pairs it has.
    Without groups, the plain mean."""
    values = values.float()
    if groups is None:
        return float(values.mean())
    if len(groups) != len(values):
        raise ValueError(f"{len(values)} values but {len(groups)} group keys")
    sums: dict[str, list[float]] = {}
    for v, g in zip(values.tolist(), groups):
        s = sums.setdefault(g, [0.0, 0])
        s[0] += v
        s[1] += 1
    return sum(t / n for t, n in sums.values()) / len(sums)


def _batch(seqs: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(i) for i, _ in seqs)
    ids = torch.tensor([i + [pad_id] * (T - len(i)) for i, _ in seqs])
    labels = torch.tensor([lab + [-100] * (T - len(lab)) for _, lab in seqs])
    mask = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in seqs])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def sequence_logps(
    model: torch.nn.Module, b: dict[str, torch.Tensor], grad_checkpoint: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's labelled tokens, and their count."""
    at = b["labels"] != -100
    logits = model(
        b["input_ids"], attention_mask=b["attention_mask"], logits_at=at, grad_checkpoint=grad_checkpoint
    ).logits
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, b["labels"][at][:, None]).squeeze(-1)
    rows = at.nonzero()[:, 0]
    n = at.sum(-1)
    return torch.zeros(at.size(0), device=lp.device).index_add(0, rows, lp), n


def pair_logps(model, items: list[tuple[Tokenized, Tokenized]], pad_id: int, batch_size: int, device: str):
    """(chosen, rejected) summed log-probs and token counts for every pair, without gradients."""
    c_lp, r_lp, c_n, r_n = [], [], [], []
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            part = items[s : s + batch_size]
            b = {k: v.to(device) for k, v in _batch([c for c, _ in part] + [r for _, r in part], pad_id).items()}
            lp, n = sequence_logps(model, b)
            k = len(part)
            c_lp.append(lp[:k])
            r_lp.append(lp[k:])
            c_n.append(n[:k])
            r_n.append(n[k:])
    return torch.cat(c_lp), torch.cat(r_lp), torch.cat(c_n), torch.cat(r_n)


def preference_metrics(
    model,
    items,
    ref: tuple[torch.Tensor, torch.Tensor],
    pad_id: int,
    batch_size: int,
    beta: float,
    device: str,
    groups: list[str] | None = None,
) -> dict[str, float]:
    """Preference accuracy, reward accuracy and margin, and DPO loss over `items`, averaged per group (prompt)
    first when `groups` is given."""
    pc, pr, nc, nr = pair_logps(model, items, pad_id, batch_size, device)
    margin = beta * ((pc - ref[0]) - (pr - ref[1]))
    loss = group_mean(-F.logsigmoid(margin), groups)
    return {
        "preference_accuracy": group_mean((pc / nc) > (pr / nr), groups),
        "reward_accuracy": group_mean(margin > 0, groups),
        "reward_margin": group_mean(margin, groups),
        "loss": loss,
        "neg_loss": -loss,
        "pairs": len(items),
        "prompts": len(set(groups or range(len(items)))),
    }


class DPOTask(Task):
    name, title, needs = "dpo", "Preference tuning (DPO)", "DPO needs a decoder model"
    model_class = DecoderLM

    def load_data(self) -> None:
        self.splits = dict(
            zip(
                ("train", "val", "test"),
                load_pair_splits(self.data, self.args["val_data"], self.args["test_data"], self.cfg.seed),
            )
        )

    def prepare(self) -> None:
        max_len = task_max_len("dpo", self.cfg, self.model.config.max_seq_len)
        self.items, self.prompts = {}, {}
        for k, v in self.splits.items():
            self.items[k], self.prompts[k] = tokenize_pairs(self.tok, v, max_len)
        if not self.items["train"]:
            raise DataError(f"no training pair keeps a reply token within max_len {max_len}")
        say(
            f"data: {len(self.items['train'])} train / {len(self.items['val'])} validation / "
            f"{len(self.items['test'])} test pairs ({len(set(self.prompts['val']))} / "
            f"{len(set(self.prompts['test']))} distinct held-out prompts)"
        )
        self.steps_per_epoch = -(-len(self.items["train"]) // self.cfg.batch_size)
        self.rows = {k: len(v) for k, v in self.items.items()} | {
            f"{k}_prompts": len(set(self.prompts[k])) for k in ("val", "test")
        }

    def after_method(self) -> None:
        model, bs, dev = self.model, self.cfg.batch_size, self.cfg.device
        # the reference: the starting model. Under LoRA, the adapters switched off; otherwise a frozen copy
        self.ref_model = model if lora_modules(model) else copy.deepcopy(model).requires_grad_(False)
        model.eval()
        t = time.time()
        with lora_disabled(model):
            self.ref = {
                k: pair_logps(self.ref_model, self.items[k], self.tok.pad_id, bs, dev)[:2] for k in ("val", "test")
            }
        say(f"reference log-probabilities for the held-out pairs in {time.time() - t:.0f} s")
        self.before = self.scores("test")
        say(f"before: held-out preference accuracy {self.before['preference_accuracy']:.3f}")

    def scores(self, split: str) -> dict[str, float]:
        return preference_metrics(
            self.model,
            self.items[split],
            self.ref[split],
            self.tok.pad_id,
            self.cfg.batch_size,
            self.args["beta"],
            self.cfg.device,
            self.prompts[split],
        )

    def batches(self, epoch: int):
        rng = random.Random(self.cfg.seed + epoch)
        train, bs = self.items["train"], self.cfg.batch_size
        order = list(range(len(train)))
        rng.shuffle(order)
        for s in range(0, len(order), bs):
            part = [train[i] for i in order[s : s + bs]]
            # (row_group: under torchrun each process takes whole pairs, chosen and rejected together)
            yield {**_batch([c for c, _ in part] + [r for _, r in part], self.tok.pad_id), "row_group": 2}

    def loss(self, m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        # m: the module training (under torchrun: the DDP wrapper or the sharded copy); under LoRA the reference
        # is m itself with its adapters switched off
        ref, training = (m if self.ref_model is self.model else self.ref_model), m.training
        with torch.no_grad(), lora_disabled(m):
            ref.eval()  # (no dropout in the reference)
            ref_lp, _ = sequence_logps(ref, b)
            ref.train(training)  # (when ref is m, back to training mode: dropout on for the policy's pass)
        lp, _ = sequence_logps(m, b, grad_checkpoint=self.cfg.grad_checkpoint)
        k = lp.size(0) // 2
        margin = self.args["beta"] * ((lp[:k] - ref_lp[:k]) - (lp[k:] - ref_lp[k:]))
        return -F.logsigmoid(margin).mean()

    def evaluate(self) -> dict[str, float]:
        return self.scores("val")

    def finish(self, fit) -> dict[str, Any]:
        self.after = a = self.scores("test")
        say(
            f"after: held-out preference accuracy {a['preference_accuracy']:.3f}, reward accuracy "
            f"{a['reward_accuracy']:.3f}, reward margin {a['reward_margin']:.3f}"
        )
        return {"beta": self.args["beta"], "before": self.before, "after": a}

    def report_rows(self) -> list[tuple[str, str]]:
        rows, b, a = self.rows, self.before, self.after
        return [
            ("beta", f"{self.args['beta']:g}"),
            ("pairs train / val / test", f"{rows['train']} / {rows['val']} / {rows['test']}"),
            (
                "distinct held-out prompts val / test (each weighs the same)",
                f"{rows['val_prompts']} / {rows['test_prompts']}",
            ),
            (
                "held-out preference accuracy before / after",
                f"{b['preference_accuracy']:.3f} / {a['preference_accuracy']:.3f}",
            ),
            ("held-out reward accuracy / margin after", f"{a['reward_accuracy']:.3f} / {a['reward_margin']:.3f}"),
        ]

    def result(self, run: Run) -> DPOResult:
        return DPOResult(
            run.out,
            run.model_dir,
            run.adapter_dir,
            self.before,
            self.after,
            run.fit.best,
            run.trainable,
            run.seconds,
            run.peak_mb,
            self.rows,
        )


def finetune_dpo(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig | None = None,
    beta: float = DPOArgs.beta,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    progress: bool | None = None,
    resume: bool = False,
) -> DPOResult | None:
    """Preference-tune a decoder with DPO (see the module notes; settings in tune/tasks.py: DPOArgs)."""
    return run_task(
        DPOTask,
        model_path,
        data,
        out,
        cfg,
        progress,
        resume,
        beta=beta,
        val_data=val_data and str(val_data),
        test_data=test_data and str(test_data),
    )
