"""Instruction tuning and DPO: chat data, assistant-only labels, packing, recipes, and both tasks end to end on a
tiny decoder that uses SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, tiny_config
from lmforge.assets import model_file
from lmforge.data.chat import Pair, chatterbot_chat, chatterbot_pairs, pack, read_chat, read_pairs, tokenize_chat
from lmforge.errors import ConfigError, DataError
from lmforge.interop.gguf import _reader
from lmforge.interop.gguf_vocab import tokenizer_from_gguf
from lmforge.models.decoder import DecoderLM
from lmforge.tune.dpo import group_mean
from lmforge.tune.recipe import resolve
from lmforge.tune.sft import collate

CONV = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "See you"},
]


@pytest.fixture(scope="module")
def tok():
    path = model_file("smollm2-135m-instruct")
    return tokenizer_from_gguf(_reader(path), str(path))


@pytest.fixture(scope="module")
def tiny_chat_model(tok, tmp_path_factory):
    """A 2-layer Llama-style decoder over SmolLM2's vocabulary, saved with its tokenizer and chat template."""
    torch.manual_seed(0)
    m = DecoderLM(
        tiny_config("llama", vocab_size=tok.vocab_size, max_seq_len=256, dropout=0.0, eos_token_id=tok.eos_id)
    )
    d = tmp_path_factory.mktemp("chatmodel") / "m"
    m.save_pretrained(d, tokenizer=tok)
    return d


def test_labels_cover_assistant_turns_only(tok):
    ids, labels = tokenize_chat(tok, CONV, 256)
    assert len(ids) == len(labels)
    targets = [t for t in labels if t != -100]
    text = tok.decode(targets, skip_special_tokens=False)
    assert "Hello there" in text and "See you" in text and text.count("<|im_end|>") == 2
    assert "Hi" not in text and "Bye" not in text and "user" not in text and "system" not in text
    # labels are next tokens: wherever a label is set it equals the following input id
    assert all(lab == ids[i + 1] for i, lab in enumerate(labels[:-1]) if lab != -100)
    # truncation that cuts every assistant token leaves nothing to train on
    assert tokenize_chat(tok, CONV, 8) is None


def test_packing_isolates_examples(tok):
    torch.manual_seed(0)
    m = DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size, max_seq_len=256, dropout=0.0)).eval()
    a = tokenize_chat(tok, CONV[:2], 256)
    b = tokenize_chat(
        tok, [{"role": "user", "content": "What is AI?"}, {"role": "assistant", "content": "Machines that think."}], 256
    )
    rows = pack([a, b], 256)
    assert len(rows) == 1 and rows[0]["segment"][-1] == 2 and rows[0]["position_ids"].count(0) == 2
    batch = collate(rows, tok.pad_id)
    with torch.no_grad():
        packed = m(
            batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits[0]
        alone = [m(torch.tensor([x[0]])).logits[0] for x in sorted([a, b], key=lambda x: -len(x[0]))]
    assert torch.allclose(packed[: alone[0].size(0)], alone[0], atol=1e-4)
    assert torch.allclose(packed[alone[0].size(0) :], alone[1], atol=1e-4)  # the second never sees the first
    assert len(pack([a, b], len(a[0]) + 1)) == 2  # rows never exceed max_len


def test_checkpointed_chunked_loss_matches_plain():
    torch.manual_seed(0)
    m = DecoderLM(tiny_config("llama", dropout=0.0)).train()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, :5] = -100
    losses, grads = [], []
    for ckpt in (False, True):
        m.zero_grad()
        loss = m(x, labels=y, logits_at=y != -100, loss_only=True, grad_checkpoint=ckpt).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-6 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_chat_and_pair_files_bad_rows(tmp_path, capsys):
    f = tmp_path / "c.jsonl"
    f.write_text(
        json.dumps({"messages": CONV})
        + "\n"
        + json.dumps({"messages": CONV[:1]})
        + "\n"
        + json.dumps({"prompt": "2+2?", "completion": "4"})
        + "\n"
    )
    convs = read_chat(f)
    assert len(convs) == 2 and convs[1][1] == {"role": "assistant", "content": "4"}
    assert "1 conversation(s) without an assistant turn" in capsys.readouterr().err
    f.write_text(json.dumps({"messages": CONV[:1]}) + "\n")
    with pytest.raises(DataError, match="no conversation has an assistant turn"):
        read_chat(f)
    assert capsys.readouterr().err == ""  # nothing usable: the error alone, no warning that repeats it
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "a "})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
    )
    assert len(read_pairs(p)) == 1 and "chosen == rejected" in capsys.readouterr().err
    p.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(DataError, match="chosen must differ"):
        read_pairs(p)
    assert capsys.readouterr().err == ""


def test_chatterbot_splits_are_disjoint_by_question():
    s = chatterbot_chat(seed=0)
    assert len(s["train"]) > 1500 and len(s["test"]) > 100
    q = {k: {c[0]["content"].strip().lower() for c in v} for k, v in s.items()}
    assert not (q["train"] & q["test"]) and not (q["train"] & q["val"])
    pairs = chatterbot_pairs(seed=0)
    assert all(isinstance(x, Pair) and x.chosen != x.rejected for x in pairs["test"])


def test_recipe_layers_and_errors(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("task: chat\nmodel: m\ndata: chatterbot\nmethod: lora\nlora_r: 4\nepochs: 2\n")
    cfg, args = resolve("chat", r, {"epochs": 1.0, "lr": None}, ["lora_r=16", "packing=false"])
    assert (cfg.method, cfg.lora_r, cfg.epochs, cfg.lr) == ("lora", 16, 1.0, 2e-4)  # flags and --set win
    assert args["packing"] is False and args["model"] == "m"
    with pytest.raises(ConfigError, match="for task 'chat', not 'dpo'"):
        resolve("dpo", r)
    with pytest.raises(ConfigError, match="unknown setting 'lora_rank'"):
        resolve("chat", r, sets=["lora_rank=4"])
    with pytest.raises(ConfigError, match=r"lora_r \(--lora-r\) must be an integer"):
        resolve("chat", r, sets=["lora_r=big"])
    with pytest.raises(ConfigError, match=r"lora_r \(--lora-r\) must be an integer"):
        resolve("chat", r, sets=["lora_r=2.5"])
    with pytest.raises(ConfigError, match=r"packing \(--packing\) must be true or false"):
        resolve("chat", r, sets=["packing=7"])
    with pytest.raises(ConfigError, match=r"grad_checkpoint \(--grad-checkpoint\) must be true or false"):
        resolve("chat", r, sets=["grad_checkpoint=maybe"])
    assert resolve("chat", r, sets=["lora_targets=[q_proj, v_proj]"])[0].lora_targets == "q_proj,v_proj"
    with pytest.raises(ConfigError, match="needs --model"):
        resolve("classify", None, {"data": "x"})


def test_sft_end_to_end_with_lora(tiny_chat_model, tmp_path):
    data = tmp_path / "chat"
    r = run_cli("data", "chatterbot", "--out", str(data))
    assert r.returncode == 0, r.stderr
    # a small slice keeps the test quick: 120 training conversations, 8 held-out questions
    train = data / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[:120]))
    out = tmp_path / "run"
    r = run_cli(
        "finetune",
        "chat",
        "--model",
        str(tiny_chat_model),
        "--data",
        str(train),
        "--val-data",
        str(data / "val.jsonl"),
        "--test-data",
        str(data / "test.jsonl"),
        "--method",
        "lora",
        "--lora-targets",
        "all",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--max-len",
        "128",
        "--eval-limit",
        "8",
        "--max-new-tokens",
        "8",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert len(val) == 3 and val[-1]["loss"] < val[0]["loss"]  # it learns the assistant replies
    assert s["before"] and s["after"] and s["trainable_params"] < s["total_params"] * 0.2
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "report" / "report.html").is_file() and len(json.loads((out / "replies.json").read_text())) == 8


def test_dpo_raises_preference_on_its_pairs(tiny_chat_model, tmp_path):
    pairs = chatterbot_pairs(seed=0)["train"][:24]
    f = tmp_path / "pairs.jsonl"
    f.write_text(
        "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    )
    out = tmp_path / "dpo"
    r = run_cli(
        "finetune",
        "dpo",
        "--model",
        str(tiny_chat_model),
        "--data",
        str(f),
        "--val-data",
        str(f),
        "--test-data",
        str(f),
        "--method",
        "lora",
        "--lora-targets",
        "all",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--beta",
        "0.5",
        "--max-len",
        "128",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["before"]["reward_margin"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert s["after"]["reward_margin"] > 0.1 and s["after"]["reward_accuracy"] > 0.7
    assert s["after"]["preference_accuracy"] >= s["before"]["preference_accuracy"]
    assert s["after"]["pairs"] == 24 and s["rows"]["test_prompts"] == s["after"]["prompts"] == len(
        {p.prompt[-1]["content"] for p in pairs}
    )


def test_group_mean_weighs_each_prompt_once():
    # a prompt with three pairs, all right, and two prompts with one pair each, wrong: per prompt 1/3, per pair 3/5
    v = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    assert group_mean(v, ["a", "a", "a", "b", "c"]) == pytest.approx(1 / 3)
    assert group_mean(v, None) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        group_mean(v, ["a"])


def _adapter_for_another_base(style: str, path, **config) -> str:
    from lmforge.interop.peft import save_adapter
    from lmforge.nn.lora import apply_lora

    other = DecoderLM(tiny_config(style, **config))
    apply_lora(other, "attn")
    return str(save_adapter(other, path))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no-assistant", "d.jsonl: no conversation has an assistant turn; SFT trains on assistant replies"),
        ("same-pair", "d.jsonl: no usable preference pair (chosen must differ from rejected)"),
        (
            "bad-target",
            "LoRA target patterns query, value match no Linear layer; this model's are named like "
            "attn.k_proj, attn.o_proj, attn.q_proj",
        ),
        ("bad-target-dpo", "LoRA target patterns c_attn match no Linear layer"),
        ("empty-val-split", "the validation split has no preference pairs: give more data or --val-data"),
        # an adapter for a Llama of another width: the names fit, the shapes do not
        (
            "adapter-other-shape",
            "adapter shapes A (8, 64) B (32, 8) do not fit the layer (16 x 32): an adapter for another base?",
        ),
        # an adapter for GPT-2: its layers have other names
        (
            "adapter-other-names",
            "the adapter targets 'transformer.h.0.attn.c_attn', which this model does not have "
            "(an adapter for another base?)",
        ),
    ],
)
def test_bad_input_one_line_exit_2(case, message, tiny_chat_model, tmp_path, capsys):
    from lmforge.cli import main  # in-process: the console script's code path without its start-up

    f = tmp_path / "d.jsonl"
    out = ["--out", str(tmp_path / "o")]
    if case == "no-assistant":
        f.write_text(json.dumps({"messages": CONV[:1]}) + "\n")
        args = ["finetune", "chat", "--model", str(tiny_chat_model), "--data", str(f), "--method", "lora", *out]
    elif case == "same-pair":
        f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}) + "\n")
        args = ["finetune", "dpo", "--model", str(tiny_chat_model), "--data", str(f), *out]
    elif case == "bad-target":
        f.write_text("".join(json.dumps({"messages": CONV}) + "\n" for _ in range(30)))
        args = [
            "finetune",
            "chat",
            "--model",
            str(tiny_chat_model),
            "--data",
            str(f),
            "--method",
            "lora",
            "--lora-targets",
            "query,value",
            "--val-data",
            str(f),
            "--test-data",
            str(f),
            "--no-eval-before",
            *out,
        ]
    elif case == "bad-target-dpo":
        f.write_text("".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" for _ in range(8)))
        args = [
            "finetune",
            "dpo",
            "--model",
            str(tiny_chat_model),
            "--data",
            str(f),
            "--val-data",
            str(f),
            "--test-data",
            str(f),
            "--method",
            "lora",
            "--lora-targets",
            "c_attn",
            *out,
        ]
    elif case == "empty-val-split":  # one question: the split by question puts every row on one side
        f.write_text("".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" for _ in range(8)))
        args = ["finetune", "dpo", "--model", str(tiny_chat_model), "--data", str(f), *out]
    else:
        style, config = ("llama", {"d_model": 64}) if case == "adapter-other-shape" else ("gpt2", {})
        adapter = _adapter_for_another_base(style, tmp_path / "adapter", **config)
        args = ["generate", "--model", str(tiny_chat_model), "--adapter", adapter, "--prompt", "hello"]
    code = main(args)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured.err  # one line: no traceback, no progress or warning before it
    assert lines[0].startswith("lmforge: error: ") and message in lines[0], lines[0]
    assert captured.out == "" and not (tmp_path / "o").exists()


def test_held_out_questions_are_scored_once_against_all_their_answers():
    from lmforge.eval.generation import reference_scores
    from lmforge.tune.sft import first_reply_prompts

    def conv(q, a):
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    convs = [
        conv("Screen black?", "Check the cable."),
        conv("Hi", "Hello."),
        conv("Screen black?", "Try a reboot."),
        [{"role": "system", "content": "Be brief."}, *conv("Hi", "Hey.")],
    ]
    prompts, refs = first_reply_prompts(convs)
    assert [p[-1]["content"] for p in prompts] == ["Screen black?", "Hi", "Hi"]  # a system turn makes it distinct
    assert refs == [["Check the cable.", "Try a reboot."], ["Hello."], ["Hey."]]
    s = reference_scores(["try a reboot", "Hello!", "no"], refs)
    assert s["exact_match"] == pytest.approx(200 / 3)  # the best of the answers counts: 1 + 1 + 0
    assert s["rougeL"] == pytest.approx(200 / 3)
    # a plain string is one reference
    assert reference_scores(["red blue"], ["red blue green"])["f1"] == pytest.approx(80.0)
