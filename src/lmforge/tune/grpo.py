"""Reinforcement learning with verifiable rewards: GRPO (Shao et al., 2024, DeepSeekMath), read top to bottom.

data     problems as JSONL rows {"prompt", "answer", ...} (lmforge.data.arith), or `arith`: the built-in
         arithmetic word problems, generated from the seed, split train / val / test by their text
reward   a verifier scores each completion in [0, 1] against its problem (lmforge.eval.verify: exact, number,
         regex:PATTERN, json, code, or a function of yours)
model    the method's transform (full / top-k / lora / qlora); the reference for the optional KL penalty is
         the starting model: under LoRA the same weights with the adapters off, otherwise a frozen copy
step     `batch_size` prompts, each sampled `group_size` times by the current policy through lmforge's
         batched decoding (seeded by the run's seed, the epoch and the batch: a resumed run draws the same);
         each completion ends at the end-of-turn token (it is scored as part of it) or at max_new_tokens
loss     advantage A = (reward - its group's mean) / (the group's std, with scale_rewards); a group whose
         rewards are all equal carries no signal and is not even run forward. On-policy (one gradient step
         per sample), the policy gradient is that of -sum over completion tokens of A * log pi(token),
         divided by the completion tokens in the batch (each token weighs the same, as DAPO and nanochat
         do), plus kl_beta * the k3 estimate of KL(pi || ref) per token
finish   greedy completions of the held-out problems before and after: accuracy (the share the verifier
         gives full reward); the best validation accuracy's weights kept; model + adapter + report with
         the reward, accuracy and completion-length curves. rollouts.jsonl holds one record per step
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.config import FinetuneConfig, SamplingParams
from lmforge.data.arith import Problem, arith_splits, read_problems
from lmforge.data.chat import apply_chat_template, held_out_splits
from lmforge.errors import DataError
from lmforge.eval.verify import Verifier, get_verifier
from lmforge.files import write_json, write_text
from lmforge.generate.chat import end_of_turn_ids
from lmforge.generate.sampling import generate_ids
from lmforge.models.decoder import DecoderLM
from lmforge.nn.lora import lora_disabled, lora_modules
from lmforge.nn.packed import release_packed
from lmforge.report import can_plot, pyplot, save_png
from lmforge.runtime import autocast, resolve_dtype
from lmforge.train.checkpoint import list_checkpoints
from lmforge.train.parallel import global_sum, is_sharded, whole_weights, world_size
from lmforge.tune.driver import Run, Task, run_footer, run_task, say
from lmforge.tune.tasks import GRPOArgs, task_max_len

ROLLOUTS = "rollouts.jsonl"


@dataclass
class GRPOResult:
    run_dir: Path
    model_dir: Path
    adapter_dir: Path | None
    before: dict[str, float]  # held-out (test) accuracy, reward and completion length of the starting model
    after: dict[str, float]
    val: dict[str, float]  # the kept weights' validation scores
    trainable_params: int
    total_params: int
    seconds: float
    peak_train_memory_mb: float
    rows: dict[str, int] = field(default_factory=dict)
    rollouts: list[dict[str, float]] = field(default_factory=list)  # one record per training step

    def summary(self) -> str:
        """What `lmforge finetune grpo` prints at the end."""
        lines = [
            f"held-out accuracy: before {self.before['accuracy']:.3f}  after {self.after['accuracy']:.3f} "
            f"({self.rows.get('test', 0)} problems); mean completion {self.before['length']:.0f} -> "
            f"{self.after['length']:.0f} tokens"
        ]
        if self.rollouts:
            k = max(1, len(self.rollouts) // 4)
            first, last = (
                sum(r["reward"] for r in part) / len(part) for part in (self.rollouts[:k], self.rollouts[-k:])
            )
            lines.append(f"training reward {first:.3f} over the first {k} steps -> {last:.3f} over the last {k}")
        lines.append(
            f"{self.seconds:.0f} s training, peak memory {self.peak_train_memory_mb:,.0f} MiB, "
            f"{self.trainable_params:,} trainable parameters"
        )
        return "\n".join(lines + [run_footer(self)])


# --------------------------------------------------------------------------------------------------------------
# data


def load_problem_splits(
    data: str | Path, val_data: str | Path | None, test_data: str | Path | None, seed: int
) -> tuple[list[Problem], list[Problem], list[Problem]]:
    """Problems split by their last user turn (`arith`: the built-in set's own split)."""
    return held_out_splits(
        data,
        val_data,
        test_data,
        seed,
        read_problems,
        lambda p: p.prompt[-1]["content"],
        "problems",
        ("arith", arith_splits),
    )


# --------------------------------------------------------------------------------------------------------------
# sampling, rewards, advantages, the loss


def complete(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    ends: list[int],
    pad_id: int,
    batch_size: int | None = None,
) -> list[list[int]]:
    """Each prompt's completion ids, through the end token when one came (it is part of the completion: the
    model learns to stop), in batches of `batch_size` rows (all at once when None). Greedy with temperature 0."""
    out: list[list[int]] = []
    step = batch_size or len(prompts)
    for s in range(0, len(prompts), step):
        part = prompts[s : s + step]
        cols = [t.tolist() for t in generate_ids(model, part, params, eos_token_id=ends or None, pad_token_id=pad_id)]
        for r in range(len(part)):
            ids = []
            for col in cols:
                ids.append(col[r])
                if col[r] in ends:
                    break
            out.append(ids)
    return out


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] (G completions of each of P prompts) -> advantages [P, G]: each reward less its group's
    mean, divided by the group's standard deviation when `scale`. A group of equal rewards gets zeros."""
    a = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        a = a / (rewards.std(dim=1, keepdim=True) + eps)
    return torch.where(rewards.std(dim=1, keepdim=True) > 0, a, torch.zeros_like(a))


def rollout_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """prompt + completion rows, right-padded, with labels on the completion tokens only (aligned with the
    inputs: labels[i] is the token at i + 1)."""
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, (s, p) in enumerate(zip(seqs, prompts)):
        n = len(s) - 1
        ids[r, :n] = torch.tensor(s[:-1])
        mask[r, :n] = 1
        labels[r, len(p) - 1 : n] = torch.tensor(s[len(p) :])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_logps(
    model: torch.nn.Module, b: dict[str, torch.Tensor], grad_checkpoint: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(token) of every labelled token (flattened, row-major) and the row each belongs to."""
    at = b["labels"] != -100
    logits = model(
        b["input_ids"], attention_mask=b["attention_mask"], logits_at=at, grad_checkpoint=grad_checkpoint
    ).logits
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, b["labels"][at][:, None]).squeeze(-1)
    return lp, at.nonzero()[:, 0]


def policy_loss(
    logp: torch.Tensor,
    rows: torch.Tensor,
    advantages: torch.Tensor,
    ref_logp: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    tokens: float | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """The token-level policy-gradient loss -sum(A_row * log pi) / tokens, plus kl_beta * the k3 estimate of
    KL(pi || ref) per token (exp(d) - d - 1 with d = log ref - log pi: unbiased and never negative). Returns
    (loss, the KL estimate). `tokens`: the divisor (default: the tokens here; under torchrun, every process's
    tokens, so the processes' losses add up to one process's). `weights` per row (0: a placeholder row that
    counts nowhere)."""
    n = max(1.0, float(logp.numel() if tokens is None else tokens))
    w = torch.ones_like(logp) if weights is None else weights.to(logp.device)[rows].to(logp.dtype)
    loss = -(advantages.to(logp.device)[rows] * logp * w).sum() / n
    kl = 0.0
    if ref_logp is not None:
        d = ref_logp - logp
        k3 = ((torch.exp(d) - d - 1) * w).sum() / n
        kl = float(k3.detach())
        loss = loss + kl_beta * k3
    return loss, kl


def verify_all(verify: Verifier, texts: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    return [verify(t, p.row()) for t, p in zip(texts, problems)]


def heldout_scores(
    model: torch.nn.Module,
    tok,
    problems: Sequence[Problem],
    verify: Verifier,
    max_new_tokens: int,
    batch_size: int = 32,
    ids: Sequence[Sequence[int]] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Greedy completions of `problems` and their scores: accuracy (the share given full reward), mean reward
    and mean completion length in tokens; and the completions. (The benchmark scores other models with it.)"""
    ids = ids if ids is not None else [tok.encode(apply_chat_template(tok, p.prompt)) for p in problems]
    ends = end_of_turn_ids(tok) + ([tok.eos_id] if tok.eos_id is not None else [])
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    comps = complete(model, ids, greedy, sorted(set(ends)), tok.pad_id, batch_size)
    texts = [tok.decode(c) for c in comps]
    rewards = verify_all(verify, texts, problems)
    n = max(1, len(rewards))
    return {
        "accuracy": sum(r >= 1.0 for r in rewards) / n,
        "reward": sum(rewards) / n,
        "length": sum(map(len, comps)) / n,
    }, texts


# --------------------------------------------------------------------------------------------------------------
# the task


class GRPOTask(Task):
    name, title, needs = "grpo", "Reinforcement learning with verifiable rewards (GRPO)", "GRPO needs a decoder model"
    model_class = DecoderLM
    images = ("loss.png", "rollouts.png")

    def check(self) -> None:
        v = self.args["verifier"]
        self.verify = get_verifier(v)  # (an unknown name or a broken reward file fails before the run starts)
        self.vname = v if isinstance(v, str) else getattr(v, "__name__", "a function")

    def load_data(self) -> None:
        a = self.args
        self.train, self.val, self.test = load_problem_splits(self.data, a["val_data"], a["test_data"], self.cfg.seed)
        if a["eval_limit"] is not None:
            self.val, self.test = self.val[: a["eval_limit"]], self.test[: a["eval_limit"]]

    def prepare(self) -> None:
        cfg, tok, max_new = self.cfg, self.tok, self.args["max_new_tokens"]
        max_len = task_max_len("grpo", cfg, self.model.config.max_seq_len)
        room = max_len - max_new  # prompt tokens that leave room to answer
        if room < 1:
            raise DataError(
                f"max_new_tokens {max_new} leaves no room for a prompt within {max_len} tokens; lower "
                f"it or raise --max-len"
            )

        def encode(problems: list[Problem], name: str) -> tuple[list[Problem], list[list[int]]]:
            kept, ids = [], []
            for p in problems:
                x = tok.encode(apply_chat_template(tok, p.prompt))
                if 0 < len(x) <= room:
                    kept.append(p)
                    ids.append(x)
            if not kept:
                raise DataError(f"no {name} prompt fits in {room} tokens (max_len less max_new_tokens)")
            if len(kept) < len(problems):
                say(f"warning: {len(problems) - len(kept)} {name} prompt(s) longer than {room} tokens skipped")
            return kept, ids

        (self.train, self.train_ids), (self.val, self.val_ids), (self.test, self.test_ids) = (
            encode(p, n) for p, n in ((self.train, "training"), (self.val, "validation"), (self.test, "test"))
        )
        self.ends = sorted(set(end_of_turn_ids(tok) + ([tok.eos_id] if tok.eos_id is not None else [])))
        say(
            f"data: {len(self.train)} train / {len(self.val)} validation / {len(self.test)} test problems; "
            f"verifier {self.vname}"
        )
        self.eval_rows = max(16, cfg.batch_size * self.args["group_size"])
        self.dtype = resolve_dtype(cfg.dtype, cfg.device, say=False)
        self.steps_per_epoch = -(-len(self.train) // cfg.batch_size)
        self.rows = {"train": len(self.train), "val": len(self.val), "test": len(self.test)}
        self.model.eval()
        t = time.time()
        self.before, _ = self.score(self.test, self.test_ids)
        say(
            f"before: held-out accuracy {self.before['accuracy']:.3f}, mean completion {self.before['length']:.1f} "
            f"tokens ({len(self.test)} problems, {time.time() - t:.0f} s)"
        )

    def score(self, problems: list[Problem], ids: list[list[int]]) -> tuple[dict[str, float], list[str]]:
        with autocast(self.dtype, self.cfg.device):  # (the precision training runs in, before and after alike)
            return heldout_scores(
                self.model, self.tok, problems, self.verify, self.args["max_new_tokens"], self.eval_rows, ids
            )

    def after_method(self) -> None:
        model = self.model
        self.ref_model = None
        if self.args["kl_beta"] > 0:  # the reference: the starting model (under LoRA, the adapters switched off)
            self.ref_model = model if lora_modules(model) else copy.deepcopy(model).requires_grad_(False).eval()
        self.rollouts_path = self.out / ROLLOUTS
        _trim_rollouts(self.out, self.rollouts_path, self.resume)

    def batches(self, epoch: int):
        """Prompt indices and a sampling seed per step: a function of the epoch alone (resume replays it)."""
        bs = self.cfg.batch_size
        rng = random.Random(self.cfg.seed + epoch)
        order = list(range(len(self.train)))
        rng.shuffle(order)
        for i, s in enumerate(range(0, len(order), bs)):
            step = epoch * self.steps_per_epoch + i + 1
            part = order[s : s + bs]
            # (under torchrun each process takes some of the prompts: `row` says where its first one stands, so
            # its completions draw from the seeds one process gives them; the loss sums over the processes itself)
            yield {
                "prompts": torch.tensor(part),
                "row": torch.arange(len(part)),
                "step": step,
                "seed": (self.cfg.seed * 1_000_003 + step) % (2**63),
                "units": None,
            }

    def loss(self, m: torch.nn.Module, b: dict[str, Any]) -> torch.Tensor:
        # m: the module training (under torchrun, the DDP wrapper: sampling runs on the model inside it; or the
        # FSDP-sharded copy: its whole weights are gathered into the task's model for the sampling, which then
        # runs with no collective inside, each process as far as its own completions need, as one process samples)
        a, tok, G, model = self.args, self.tok, self.args["group_size"], self.model
        sharded = is_sharded(m)
        policy, training = (model if sharded else getattr(m, "module", m)), m.training
        idx = b["prompts"].tolist()
        prompts = [self.train_ids[i] for i in idx for _ in range(G)]
        problems = [self.train[i] for i in idx for _ in range(G)]
        t0 = time.time()
        policy.eval()  # (no dropout while sampling)
        params = SamplingParams(
            max_new_tokens=a["max_new_tokens"], temperature=a["temperature"], seed=int(b["seed"]) + int(b["row"][0]) * G
        )  # (row i draws from seed + i)
        with whole_weights(model, m) if sharded else contextlib.nullcontext():
            comps = complete(policy, prompts, params, self.ends, tok.pad_id)
        policy.train(training)
        sampled = time.time() - t0
        rewards = torch.tensor(verify_all(self.verify, [tok.decode(c) for c in comps], problems))
        adv = group_advantages(rewards.view(-1, G), a["scale_rewards"]).flatten()
        keep = adv.nonzero()[:, 0].tolist() or [0]  # (no signal at all: one row, weight 0, keeps the step uniform)
        weights = torch.tensor([float(adv[k] != 0) for k in keep])
        batch = rollout_batch([prompts[k] for k in keep], [comps[k] for k in keep], tok.pad_id)
        tokens = float(((batch["labels"] != -100).sum(-1) * weights).sum())
        # every process's tokens: the processes' losses (their gradients averaged) add up to one process's
        tokens_all = global_sum(tokens) / world_size()
        device = next(m.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        ref_logp = None
        if self.ref_model is not None:  # (under LoRA the reference is m itself with its adapters off)
            ref = m if self.ref_model is model else self.ref_model
            with torch.no_grad(), lora_disabled(ref):
                ref.eval()  # (no dropout in the reference)
                ref_logp, _ = token_logps(ref, batch)
            if ref is m:
                m.train(training)
        logp, rows = token_logps(m, batch, self.cfg.grad_checkpoint)
        loss, kl = policy_loss(logp, rows, adv[keep], ref_logp, a["kl_beta"], tokens=tokens_all, weights=weights)
        ended = sum(bool(c) and c[-1] in self.ends for c in comps)
        if os.environ.get("RANK", "0") == "0":  # (under torchrun: process 0's samples stand for the step)
            _append(
                self.rollouts_path,
                {
                    "step": int(b["step"]),
                    "reward": float(rewards.mean()),
                    "accuracy": float((rewards >= 1.0).float().mean()),
                    "length": sum(map(len, comps)) / len(comps),
                    "ended": ended / len(comps),
                    "signal": float((rewards.view(-1, G).std(dim=1) > 0).float().mean()),
                    "kl": kl,
                    "sample_seconds": sampled,
                    "seconds": time.time() - t0,
                },
            )
        return loss

    def evaluate(self) -> dict[str, float]:
        return self.score(self.val, self.val_ids)[0]

    def finish(self, fit) -> dict[str, Any]:
        self.after, texts = self.score(self.test, self.test_ids)
        release_packed(self.model)
        say(f"after: held-out accuracy {self.after['accuracy']:.3f}, mean completion {self.after['length']:.1f} tokens")
        self.rollouts = read_rollouts(self.rollouts_path)
        write_json(
            self.out / "completions.json",
            [
                {"prompt": p.prompt[-1]["content"], "answer": p.answer, "completion": y}
                for p, y in zip(self.test, texts)
            ],
        )
        plot_rollouts(
            self.rollouts, [r for r in fit.history if r.get("split") == "val"], self.out / "report" / "rollouts.png"
        )
        self.samples = [
            (p.prompt[-1]["content"], f"completion: {y!r} | answer: {p.answer}")
            for p, y in list(zip(self.test, texts))[:8]
        ]
        a = self.args
        return {
            "verifier": self.vname,
            "group_size": a["group_size"],
            "kl_beta": a["kl_beta"],
            "before": self.before,
            "after": self.after,
        }

    def report_rows(self) -> list[tuple[str, str]]:
        a, b, f = self.args, self.before, self.after
        return [
            ("verifier / group size / KL beta", f"{self.vname} / {a['group_size']} / {a['kl_beta']:g}"),
            ("problems train / val / test", f"{len(self.train)} / {len(self.val)} / {len(self.test)}"),
            ("held-out accuracy before / after", f"{b['accuracy']:.3f} / {f['accuracy']:.3f}"),
            ("mean completion tokens before / after", f"{b['length']:.1f} / {f['length']:.1f}"),
        ] + self.samples

    def result(self, run: Run) -> GRPOResult:
        return GRPOResult(
            run.out,
            run.model_dir,
            run.adapter_dir,
            self.before,
            self.after,
            run.fit.best,
            run.trainable,
            run.total,
            run.seconds,
            run.peak_mb,
            self.rows,
            self.rollouts,
        )


def finetune_grpo(
    model_path: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: FinetuneConfig | None = None,
    verifier: str | Callable[[str, dict[str, Any]], float] = GRPOArgs.verifier,
    group_size: int = GRPOArgs.group_size,
    max_new_tokens: int = GRPOArgs.max_new_tokens,
    temperature: float = GRPOArgs.temperature,
    kl_beta: float = GRPOArgs.kl_beta,
    scale_rewards: bool = GRPOArgs.scale_rewards,
    eval_limit: int | None = None,
    val_data: str | Path | None = None,
    test_data: str | Path | None = None,
    progress: bool | None = None,
    resume: bool = False,
) -> GRPOResult | None:
    """Train a decoder with GRPO on verifiable rewards (see the module notes; settings in tune/tasks.py:
    GRPOArgs). `verifier` may also be a function (completion, problem row) -> reward."""
    return run_task(
        GRPOTask,
        model_path,
        data,
        out,
        cfg,
        progress,
        resume,
        verifier=verifier,
        group_size=group_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        kl_beta=kl_beta,
        scale_rewards=scale_rewards,
        eval_limit=eval_limit,
        val_data=val_data and str(val_data),
        test_data=test_data and str(test_data),
    )


# --------------------------------------------------------------------------------------------------------------
# the per-step records and their plot


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_rollouts(path: str | Path) -> list[dict[str, Any]]:
    """The per-step records, the last one of each step (a step replayed after a resume is written again)."""
    path = Path(path)
    by_step: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                by_step[r["step"]] = r
    return [by_step[k] for k in sorted(by_step)]


def _trim_rollouts(run_dir: Path, path: Path, resume: bool) -> None:
    """A resumed run continues from its newest checkpoint: the records of later steps are dropped (they are
    sampled and written again); a run killed before its first checkpoint starts over."""
    if not resume or not path.exists():
        return
    ckpts = list_checkpoints(run_dir)
    upto = int(ckpts[-1].name.rsplit("_", 1)[-1]) if ckpts else 0
    kept = [r for r in read_rollouts(path) if r["step"] <= upto]
    write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_rollouts(rollouts: list[dict[str, Any]], val: list[dict[str, Any]], path: Path) -> Path | None:
    """Reward (and its moving mean), accuracy (training samples and validation) and completion length by step."""
    if not rollouts or not can_plot():
        return None
    plt = pyplot()
    steps = [r["step"] for r in rollouts]
    w = max(1, len(rollouts) // 10)

    def smooth(v: list[float]) -> list[float]:
        return [sum(v[max(0, i - w + 1) : i + 1]) / len(v[max(0, i - w + 1) : i + 1]) for i in range(len(v))]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    reward = [r["reward"] for r in rollouts]
    axes[0].plot(steps, reward, lw=0.8, alpha=0.5, color="#4c72b0", label="per step")
    axes[0].plot(steps, smooth(reward), lw=1.8, color="#4c72b0", label=f"mean of {w}")
    axes[0].set_title("reward of the sampled completions")
    axes[1].plot(steps, smooth([r["accuracy"] for r in rollouts]), lw=1.5, color="#55a868", label="training samples")
    if val:
        axes[1].plot(
            [r["step"] for r in val],
            [r["accuracy"] for r in val],
            "o-",
            ms=3,
            color="#dd8452",
            label="validation (greedy)",
        )
    axes[1].set_title("accuracy")
    axes[2].plot(steps, [r["length"] for r in rollouts], lw=1, color="#8172b2")
    axes[2].set_title("mean completion length (tokens)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    return save_png(fig, path)
