"""GRPO (reinforcement learning with verifiable rewards): the verifiers, the built-in arithmetic set, group
advantages and the policy loss, and the task end to end on a tiny decoder over a word-level vocabulary of 27 tokens
(so a random policy hits the reward often enough to learn from): it must learn, resume bitwise, and refuse bad
input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from conftest import call_cli, tiny_config
from lmforge.config import FinetuneConfig, encoder_config
from lmforge.data.arith import arith_problems, arith_splits, read_problems
from lmforge.errors import ConfigError, DataError
from lmforge.eval.verify import get_verifier, last_number
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.tokenizer import Tokenizer
from lmforge.tune import grpo
from lmforge.tune.grpo import finetune_grpo, group_advantages, policy_loss, read_rollouts, rollout_batch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = [
    "[UNK]",
    "user",
    "assistant",
    "system",
    *"0123456789",
    "say",
    "a",
    "number",
    "please",
    "now",
    "give",
    "me",
    "the",
    "answer",
    "one",
]


# --- verifiers ----------------------------------------------------------------------------------------------------


def test_built_in_verifiers():
    p = {"prompt": "q", "answer": "42"}
    assert get_verifier("exact")("  42 ", p) == 1.0 and get_verifier("exact")("42.", p) == 0.0
    number = get_verifier("number")
    assert number("6 times 7 is 42", p) == 1.0 and number("42 or 41", p) == 0.0 and number("no idea", p) == 0.0
    assert number("The answer: 42.0", p) == 1.0 and number("1,234", {"answer": "1234"}) == 1.0
    assert last_number("it is -3 then 2.5") == 2.5
    assert get_verifier(r"regex:Answer: (\d+)")("so Answer: 42", p) == 1.0
    assert get_verifier(r"regex:Answer: (\d+)")("so Answer: 43", p) == 0.0
    assert get_verifier(r"regex:^\d+$")("17", {"prompt": "q"}) == 1.0  # no group: a match is enough
    js = get_verifier("json")
    assert js('{"a": 1}', {}) == 1.0 and js("```json\n[1, 2]\n```", {}) == 1.0 and js("{a: 1}", {}) == 0.0
    assert js('{"a": 1}', {"answer": '{"a": 1}'}) == 1.0 and js('{"a": 2}', {"answer": '{"a": 1}'}) == 0.0


def test_code_verifier_runs_the_tests_in_another_process_with_a_time_limit():
    from lmforge.eval.verify import code

    tests = {"tests": ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]}
    assert code("```python\ndef add(a, b):\n    return a + b\n```", tests) == 1.0
    assert code("def add(a, b):\n    return a - b", tests) == 0.0
    assert code("import os\nos._exit(0) if False else None\ndef add(a, b): return a + b", tests) == 1.0
    assert code("def add(a, b):\n    while True: pass", tests, timeout=1.0) == 0.0  # stopped, not hung
    # never in this process: a completion that exits or changes state here would otherwise end the run
    assert code("import sys; sys.exit(3)", {}) == 0.0 and code("x = 1", {}) == 1.0
    assert code("x = bytearray(2 << 30)", {}) == 0.0  # past the 1 GB memory limit: refused, not swapped in


def test_code_verifier_kills_what_the_program_started_at_the_time_limit(tmp_path):
    import time

    from lmforge.eval.verify import code

    pid_file = tmp_path / "child.pid"
    program = (
        f"import subprocess, sys, time\np = subprocess.Popen([sys.executable, '-c', 'import time; "
        f"time.sleep(60)'])\nopen({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(60)"
    )
    assert code(program, {}, timeout=2.0) == 0.0
    pid = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline:
        try:
            if open(f"/proc/{pid}/stat").read().split()[2] == "Z":
                break
        except OSError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("a process the program started outlived the time limit")


def test_custom_reward_functions(tmp_path):
    assert get_verifier(lambda c, p: c == p["answer"])("7", {"answer": "7"}) == 1.0  # a bool counts as 0 / 1
    f = tmp_path / "reward.py"
    f.write_text(
        "def brevity(completion, problem):\n    return 1 / (1 + len(completion))\n"
        "def broken(completion, problem):\n    return 'yes'\n"
    )
    assert get_verifier(f"{f}:brevity")("abc", {}) == pytest.approx(0.25)
    assert get_verifier("lmforge.eval.verify:exact")("x", {"answer": "X"}) == 1.0  # module.path:function
    with pytest.raises(ConfigError, match="a reward must be a finite number"):
        get_verifier(f"{f}:broken")("abc", {})
    for spec, message in (
        ("nope", "unknown verifier 'nope'; known: exact, number"),
        (f"{f}:missing", "has no function 'missing'"),
        (f"{tmp_path / 'none.py'}:f", "none.py does not exist"),
        ("regex:(", "does not compile"),
    ):
        with pytest.raises(ConfigError, match=message):
            get_verifier(spec)


# --- the built-in set -----------------------------------------------------------------------------------------------


def test_arith_set_is_seeded_exact_and_split_disjoint(tmp_path):
    a, b = arith_splits(0, train=300, val=20, test=50), arith_splits(0, train=300, val=20, test=50)
    assert {k: [p.row() for p in v] for k, v in a.items()} == {k: [p.row() for p in v] for k, v in b.items()}
    assert [len(a[k]) for k in ("train", "val", "test")] == [300, 20, 50]
    texts = {k: {p.prompt[-1]["content"] for p in v} for k, v in a.items()}
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["val"])
    assert not (texts["val"] & texts["test"]) and len(texts["train"]) == 300  # no repeats within a split either
    assert arith_splits(1, train=300, val=20, test=50)["test"][0].row() != a["test"][0].row()
    # a larger request keeps the split of every problem (a hash of its text): nothing moves into training
    bigger = arith_splits(0, train=600, val=20, test=50)
    assert not ({p.prompt[-1]["content"] for p in bigger["train"]} & texts["test"])
    for p in arith_problems(200, seed=3):  # the stated answer is the arithmetic's
        q = p.prompt[0]["content"]
        nums = [int(x) for x in __import__("re").findall(r"\d+", q)]
        if q.startswith("What is"):
            a_, b_ = nums
            op = {"plus": a_ + b_, "minus": a_ - b_, "times": a_ * b_}[q.split()[3]]
            assert p.answer == str(op)
        assert int(p.answer) >= 0 and q.endswith("Answer with the final number only.")
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p.row()) + "\n" for p in a["test"][:5]))
    assert [p.row() for p in read_problems(f)] == [p.row() for p in a["test"][:5]]
    f.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(DataError, match="each row needs prompt and answer"):
        read_problems(f)


# --- advantages and the loss ----------------------------------------------------------------------------------------


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 1.0, 0.5]])
    a = group_advantages(r)
    assert torch.equal(a[1], torch.zeros(4)) and torch.equal(a[2], torch.zeros(4))  # equal rewards: no signal
    assert a[0, 0] > 0 and (a[0, 1:] < 0).all() and a[0].sum().abs() < 1e-5
    assert a[3, 2] > a[3, 0] == a[3, 3] == 0 > a[3, 1]
    assert torch.allclose(group_advantages(r, scale=False)[0], torch.tensor([0.75, -0.25, -0.25, -0.25]))
    assert torch.allclose(a[0] * r[0].std(), torch.tensor([0.75, -0.25, -0.25, -0.25]), atol=1e-3)


def test_policy_loss_raises_the_log_probability_of_rewarded_tokens():
    logp = torch.log(torch.tensor([0.5, 0.5, 0.5, 0.5])).requires_grad_(True)
    rows = torch.tensor([0, 0, 1, 1])  # two completions of two tokens each
    loss, kl = policy_loss(logp, rows, torch.tensor([1.0, -1.0]))
    loss.backward()
    # gradient descent moves log-probabilities against the gradient: up for the better completion, down for the other
    assert (logp.grad[:2] < 0).all() and (logp.grad[2:] > 0).all() and kl == 0.0
    assert torch.allclose(logp.grad, torch.tensor([-0.25, -0.25, 0.25, 0.25]))  # per token: / 4 tokens
    same, kl = policy_loss(logp.detach(), rows, torch.zeros(2), ref_logp=logp.detach(), kl_beta=1.0)
    assert float(same) == 0.0 and kl == 0.0  # the k3 estimate is 0 at the reference
    _, kl = policy_loss(logp.detach(), rows, torch.zeros(2), ref_logp=logp.detach() - 1, kl_beta=1.0)
    assert kl > 0


def test_rollout_batch_labels_the_completion_only():
    b = rollout_batch([[5, 6, 7], [5]], [[8, 9], [10, 11, 12]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [5, 10, 11, 0]]
    assert b["labels"].tolist() == [[-100, -100, 8, 9], [10, 11, 12, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


# --- end to end -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_model(tmp_path_factory) -> Path:
    """A 2-layer decoder over a word-level vocabulary (ChatML's markers as special tokens, the ten digits and a few
    words), saved with its tokenizer."""
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(SPECIALS)
    tok = Tokenizer(hf, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    m = DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size, max_seq_len=64, dropout=0.0, eos_token_id=tok.eos_id))
    d = tmp_path_factory.mktemp("wordmodel") / "m"
    m.save_pretrained(d, tokenizer=tok)
    return d


@pytest.fixture(scope="module")
def sevens(tmp_path_factory) -> Path:
    """Problems whose answer is always 7: the policy must learn to end on a 7."""
    words = ["say", "a", "number", "please", "now", "give", "me", "the", "answer", "one"]
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(60):
        pick = torch.randint(0, len(words), (4,), generator=g).tolist()
        rows.append({"prompt": " ".join(words[k] for k in pick) + f" {i % 10}", "answer": "7"})
    f = tmp_path_factory.mktemp("sevens") / "sevens.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _run(model: Path, data: Path, out: Path, resume: bool = False, **kw):
    cfg = FinetuneConfig(
        method=kw.pop("method", "full"),
        epochs=kw.pop("epochs", 2),
        batch_size=4,
        lr=kw.pop("lr", 1e-2),
        metric="accuracy",
        log_every=1,
        ckpt_every=kw.pop("ckpt_every", 0),
        eval_every=0,
        warmup=0.0,
        lora_targets="all",
        lora_dropout=0.1,
    )
    return finetune_grpo(
        model,
        data,
        out,
        cfg,
        verifier="number",
        group_size=8,
        max_new_tokens=4,
        temperature=1.0,
        val_data=data,
        test_data=data,
        eval_limit=20,
        progress=False,
        resume=resume,
        **kw,
    )


def test_grpo_learns_a_verifiable_reward(word_model, sevens, tmp_path):
    res = _run(word_model, sevens, tmp_path / "run")
    rewards = [r["reward"] for r in res.rollouts]
    assert len(rewards) == 30 and res.rows["train"] == 60  # 15 steps of 4 prompts an epoch, 2 epochs
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.3 and last > 0.8, rewards  # the reward of the sampled completions rises
    assert res.after["accuracy"] >= res.before["accuracy"] + 0.5, (res.before, res.after)  # and greedy accuracy
    out = tmp_path / "run"
    for f in (
        "summary.json",
        "metrics.jsonl",
        "rollouts.jsonl",
        "completions.json",
        "recipe.yaml",
        "report/report.html",
        "report/rollouts.png",
        "model/model.safetensors",
    ):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["accuracy"] == res.after["accuracy"] and s["best_val"]["accuracy"] >= s["after"]["accuracy"] - 1
    assert "held-out accuracy: before" in res.summary() and "training reward" in res.summary()


class Stop(Exception):
    pass


def test_grpo_resumes_bitwise(word_model, sevens, tmp_path, monkeypatch):
    kw = dict(method="lora", epochs=1, lr=5e-3, ckpt_every=5, kl_beta=0.1)
    ref = _run(word_model, sevens, tmp_path / "ref", **dict(kw))
    calls = {"n": 0}
    real = grpo.policy_loss

    def dies_in_step_8(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:
            raise Stop  # killed between checkpoint 5 and 10
        return real(*a, **k)

    monkeypatch.setattr(grpo, "policy_loss", dies_in_step_8)
    with pytest.raises(Stop):
        _run(word_model, sevens, tmp_path / "cut", **dict(kw))
    assert len(read_rollouts(tmp_path / "cut" / "rollouts.jsonl")) == 7
    monkeypatch.setattr(grpo, "policy_loss", real)
    res = _run(word_model, sevens, tmp_path / "cut", resume=True, **dict(kw))

    def untimed(rollouts):
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rollouts]

    assert untimed(res.rollouts) == untimed(ref.rollouts) and len(res.rollouts) == 15  # the same samples and rewards
    assert res.after == ref.after and res.val == ref.val
    a = load_file(tmp_path / "ref" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("enc") / "enc"
    wp = Tokenizer.train_wordpiece(["the cat sat", "a dog ran"] * 10, vocab_size=60)
    cfg = encoder_config("bert-mini", vocab_size=wp.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=40)
    Encoder(cfg).save_pretrained(d, tokenizer=wp)
    return d


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--verifier", "nope"], "unknown verifier 'nope'; known: exact, number, regex:PATTERN"),
        (["--group-size", "1"], "group_size (--group-size) must be a whole number >= 2, got 1"),
        (["--temperature", "0"], "temperature (--temperature) must be > 0, got 0"),
        (["--kl-beta", "-1"], "kl_beta (--kl-beta) must be >= 0, got -1"),
        (["--max-new-tokens", "64"], "max_new_tokens 64 leaves no room for a prompt within 64 tokens"),
        (["--model", "ENCODER"], "is a Encoder; GRPO needs a decoder model"),
        (["--data", "DIR"], "does not exist (expected a JSONL file)"),
    ],
)
def test_bad_input_one_line_exit_2(flags, message, word_model, sevens, encoder_dir, tmp_path, capsys):
    flags = [str(encoder_dir) if f == "ENCODER" else str(tmp_path) if f == "DIR" else f for f in flags]
    r = call_cli(
        capsys,
        "finetune",
        "grpo",
        "--model",
        str(word_model),
        "--data",
        str(sevens),
        "--epochs",
        "0.05",
        "--out",
        str(tmp_path / "o"),
        *flags,
    )
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("lmforge: error: ") and message in lines[0], lines[0]
    assert r.stdout == "" and not (tmp_path / "o").exists()
