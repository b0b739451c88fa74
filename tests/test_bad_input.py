"""Bad input through the CLI, verb by verb: each case exits 2 with exactly one line on stderr that names the
problem (a substring of it is in the table), no traceback, and leaves nothing behind anywhere in the test's
folder (the tree is compared before and after).

The table covers every numeric flag at 0 and below where such values make no sense, every path flag pointed at a
file, a folder, nothing and something unreadable (invalid bytes, a truncated file, a folder where a file belongs),
every output flag pointed at an existing file, a path under a file and a place nobody can write (/proc: even root
cannot create a file there), and the cases of issue 20. Cases run in-process through `call_cli` on tiny models
made once for the module; one case runs in a subprocess to show the exit status of a real process. A few
argparse usage errors (usage + one error line) are in their own short table."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml

from conftest import call_cli, run_cli, tiny_config
from lmforge.config import encoder_config, seq2seq_config
from lmforge.interop.quantized import save_quantized
from lmforge.models.decoder import DecoderLM
from lmforge.models.encoder import Encoder
from lmforge.models.seq2seq import Seq2SeqLM
from lmforge.nn.quant import quantize_model
from lmforge.tokenizer import Tokenizer

TEXTS = [
    "the cat sat on the mat",
    "a dog ate the bone",
    "what a lovely day",
    "this is terrible news",
    "i love this film",
    "i hate rainy mondays",
    "the weather is fine",
    "nothing happened today",
] * 5


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, str]:
    """The world every case is formatted with: tiny models and good / bad files, by name."""
    root = tmp_path_factory.mktemp("bad-input")
    p: dict[str, Path] = {"root": root}
    bpe = Tokenizer.train_bpe(TEXTS, vocab_size=300)
    wordpiece = Tokenizer.train_wordpiece(TEXTS, vocab_size=200)
    torch.manual_seed(0)
    DecoderLM(tiny_config("gpt2", vocab_size=bpe.vocab_size)).save_pretrained(root / "dec", tokenizer=bpe)
    for name, head, labels in (("clf", "classify", ["neg", "pos"]), ("enc", "none", []), ("qa", "qa", [])):
        cfg = encoder_config(
            "bert-mini",
            vocab_size=wordpiece.vocab_size,
            n_layer=1,
            n_head=2,
            d_model=32,
            max_seq_len=40,
            head=head,
            labels=labels,
            dropout=0.0,
            attn_dropout=0.0,
        )
        Encoder(cfg).eval().save_pretrained(root / name, tokenizer=wordpiece)
    p.update(dec=root / "dec", clf=root / "clf", enc=root / "enc", qa=root / "qa")
    unigram = Tokenizer.train_unigram(TEXTS, vocab_size=150)
    Seq2SeqLM(
        seq2seq_config(
            "t5-tiny",
            vocab_size=unigram.vocab_size,
            pad_token_id=unigram.pad_id,
            eos_token_id=unigram.eos_id,
            decoder_start_token_id=unigram.pad_id,
            n_layer=1,
            n_decoder_layer=1,
            d_model=32,
            n_head=2,
            d_ff=64,
        )
    ).save_pretrained(root / "s2s", tokenizer=unigram)
    q8 = DecoderLM(tiny_config("gpt2", vocab_size=bpe.vocab_size))
    save_quantized(quantize_model(q8, "int8"), root / "q8", bpe)
    p.update(s2s=root / "s2s", q8=root / "q8")

    def write(name: str, data: str | bytes) -> Path:
        f = root / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        p[name.split("/")[0].replace(".", "_")] = f
        return f

    def folder(name: str) -> Path:
        (root / name).mkdir()
        p[name] = root / name
        return root / name

    write("notes.txt", "some notes\n")
    p.update(
        file=p["notes_txt"],
        under=p["notes_txt"] / "sub",
        missing=root / "nothing" / "here",
        proc=Path("/proc/lmforge-x"),
    )
    p["dir"] = folder("empty_dir")
    p["txtdir"] = folder("texts_dir.txt")
    folder("keep")
    write("keep/mine.txt", "keep me\n")
    p["keep"] = root / "keep"
    garbage = bytes(range(128, 256)) * 8  # not UTF-8, not JSON, not YAML, not a model
    write("garbage.bin", garbage)
    write("garbage.txt", garbage)
    write("garbage.csv", garbage[:40] + b"\n")
    write("garbage.yaml", garbage)
    write("junk.gguf", b"GGUF" + garbage)
    write("latin1/plays.txt", "Café crème, señor\n".encode("latin-1") * 50)
    p["latin1_file"] = root / "latin1" / "plays.txt"
    p["latin1"] = root / "latin1"
    write("corpus/a.txt", "\n".join(TEXTS) + "\n")
    write("corpus/b.txt", "\n".join(reversed(TEXTS)) + "\n")
    p["corpus"] = root / "corpus"
    write("oneline.txt", "word " * 40_000)  # one 200 kB line
    write("blank.txt", "  \n\n ")
    write("labelled.csv", "text,label\n" + "".join(f"{t},{'pos' if i % 2 else 'neg'}\n" for i, t in enumerate(TEXTS)))
    write("unknown_labels.csv", "text,label\n" + "".join(f"{t},maybe\n" for t in TEXTS[:4]))
    write("nolabel.csv", "a,b\n1,2\n")
    write("header_only.csv", "text,label\n")
    write("bad.jsonl", '{"text": "fine", "label": "pos"}\n{not json\n')
    write("bad.tsv.json", "[1, 2")
    write("texts.txt", "\n".join(TEXTS[:4]) + "\n")
    write(
        "squad.json",
        json.dumps(
            {
                "data": [
                    {
                        "title": "t",
                        "paragraphs": [
                            {
                                "context": "the cat sat on the mat",
                                "qas": [
                                    {
                                        "id": "1",
                                        "question": "who sat?",
                                        "answers": [{"text": "the cat", "answer_start": 0}],
                                    }
                                ],
                            }
                        ],
                    }
                ]
            }
        ),
    )
    write(
        "choices.jsonl",
        "".join(json.dumps({"question": t, "choices": ["yes", "no"], "answer": 0}) + "\n" for t in TEXTS[:4]),
    )
    write("pairs.jsonl", "".join(json.dumps({"source": t, "target": t[::-1]}) + "\n" for t in TEXTS))
    write(
        "chat.jsonl",
        "".join(
            json.dumps({"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]}) + "\n"
            for t in TEXTS
        ),
    )
    write("dpo.jsonl", "".join(json.dumps({"prompt": t, "chosen": t, "rejected": t[::-1]}) + "\n" for t in TEXTS))
    write("problems.jsonl", "".join(json.dumps({"prompt": t, "answer": str(i)}) + "\n" for i, t in enumerate(TEXTS)))
    recipe = {
        "model": {"preset": "bench-gpt2", "n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 32},
        "data": {"sources": [str(p["corpus"])], "vocab_size": 280},
        "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "eval_every": 0, "ckpt_every": 0, "peak_tflops": 1.0},
    }
    write("recipe.yaml", yaml.safe_dump(recipe))
    recipe["data"]["sources"] = [str(p["oneline_txt"])]
    write("oneline.yaml", yaml.safe_dump(recipe))
    write("list.yaml", "- a\n- b\n")
    write("ft.yaml", "lr: -1\n")

    # broken model directories: each lacks or damages one part of a good one
    good = (p["dec"] / "model.safetensors").read_bytes()
    for name in ("trunc", "noweights", "badconfig", "badheader", "weightsdir", "noconfig", "badtok", "shards"):
        d = root / name
        d.mkdir()
        for f in p["dec"].iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        p[name] = d
    (p["trunc"] / "model.safetensors").write_bytes(good[: len(good) - 100])
    (p["noweights"] / "model.safetensors").unlink()
    (p["badconfig"] / "config.json").write_bytes(garbage)
    n = struct.unpack("<Q", good[:8])[0]
    (p["badheader"] / "model.safetensors").write_bytes(good[:8] + b"\xff" * n + good[8 + n :])
    (p["weightsdir"] / "model.safetensors").unlink()
    (p["weightsdir"] / "model.safetensors").mkdir()
    (p["noconfig"] / "config.json").unlink()
    (p["badtok"] / "tokenizer.json").write_bytes(garbage)
    (p["shards"] / "model.safetensors").unlink()  # an index naming a shard that never arrived
    (p["shards"] / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}})
    )
    # an adapter directory whose weights were cut short, and one with no weights file
    for name in ("ad_trunc", "ad_noweights", "ad_badconfig"):
        d = folder(name)
        (d / "adapter_config.json").write_text(
            json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]})
        )
    (p["ad_trunc"] / "adapter_model.safetensors").write_bytes(good[:200])
    (p["ad_badconfig"] / "adapter_config.json").write_bytes(garbage)
    (p["ad_badconfig"] / "adapter_model.safetensors").write_bytes(good)
    return {k: str(v) for k, v in p.items()}


def tree(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            f = Path(dirpath) / name
            st = f.lstat()
            out[str(f)] = (st.st_size, st.st_mtime_ns if f.is_file() else 0)
    return out


def one_line_error(proc, needle: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr  # one line: the problem and the fix
    assert lines[0].startswith("lmforge: error: "), lines[0]
    assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# The argv of a case is split on spaces after formatting with `w` ({tag}: a path of the world above; '' is an
# empty argument). In the templates below OUT, MODEL and DATA stand for the path a group of cases varies.
FT_BASE = {
    "classify": ("finetune classify --model {clf} --out OUT --data DATA", "{labelled_csv}"),
    "qa": ("finetune qa --model {enc} --out OUT --data DATA", "{squad_json}"),
    "chat": ("finetune chat --model {dec} --out OUT --data DATA", "{chat_jsonl}"),
    "dpo": ("finetune dpo --model {dec} --out OUT --data DATA", "{dpo_jsonl}"),
    "grpo": ("finetune grpo --model {dec} --out OUT --data DATA", "{problems_jsonl}"),
    "seq2seq": ("finetune seq2seq --model t5-tiny --out OUT --data DATA", "{pairs_jsonl}"),
}


# settings that keep a run short should a bad value be let through (a flag given again later wins)
FT_SHORT = {
    "classify": "--epochs 1",
    "qa": "--epochs 1 --max-len 32",
    "dpo": "--epochs 1 --max-len 32",
    "grpo": "--epochs 0.05 --group-size 2 --max-new-tokens 2 --eval-limit 2",
    "chat": "--epochs 1 --max-len 128 --eval-limit 2 --max-new-tokens 4 --no-eval-before",
    "seq2seq": "--epochs 1 --batch-size 16 --max-len 16 --eval-limit 2 --num-beams 1",
}


def ft(task: str, out: str = "{root}/ft", data: str | None = None) -> str:
    template, default = FT_BASE[task]
    return template.replace("OUT", out).replace("DATA", data or default) + " " + FT_SHORT[task]


FT_CLASSIFY = ft("classify")
GEN = "generate --model {dec} --prompt hi"
CHAT = "chat --model {dec} --prompt hi"
PPL = "eval perplexity --model {dec} --data {corpus}"
EXPLAIN = "explain --model {dec} --text hello --out {root}/ex"
PRUNE = "prune --model {dec} --sparsity 0.5 --out {root}/pruned"
SERVE = "serve --model {dec}"
EVALS = {
    "classify": "eval classify --model {clf} --data {labelled_csv}",
    "qa": "eval qa --model {qa} --data {squad_json}",
    "choice": "eval choice --model {dec} --data {choices_jsonl}",
    "seq2seq": "eval seq2seq --model {dec} --data {pairs_jsonl}",
}

CASES: list[tuple[str, str, str]] = []  # (id, argv, what the user must read)


def case(id_: str, argv: str, needle: str) -> None:
    CASES.append((id_, argv, needle))


def snake(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


# --- numeric flags at 0 and below (and past their top where they have one) -----------------------------------
for v in ("0", "-5", "100"):
    case(
        f"tokenizer-vocab-size-{v}",
        f"tokenizer train --data {{corpus}} --out {{root}}/tok --vocab-size {v}",
        "--vocab-size must be a whole number of at least",
    )
for verb, base in (("generate", GEN), ("chat", CHAT)):
    for flag, v, needle in (
        ("--max-new-tokens", "0", "--max-new-tokens must be a whole number >= 1"),
        ("--max-new-tokens", "-1", "--max-new-tokens must be a whole number >= 1"),
        ("--temperature", "-0.5", "--temperature must be >= 0"),
        ("--top-k", "0", "--top-k must be a whole number >= 1"),
        ("--top-k", "-3", "--top-k must be a whole number >= 1"),
        ("--top-p", "0", "--top-p must be in (0, 1]"),
        ("--top-p", "-0.1", "--top-p must be in (0, 1]"),
        ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ):
        case(f"{verb}{flag}-{v}", f"{base} {flag} {v}", needle)
    if verb == "generate":  # (chat shortens its reply to fit instead, with a note: NOTES below)
        case(f"{verb}-max-new-tokens-past-context", f"{base} --max-new-tokens 500", "exceeds the model's context")
for v in ("0", "-1"):
    case(f"generate--repetition-penalty-{v}", f"{GEN} --repetition-penalty {v}", "--repetition-penalty must be > 0")
for flag, v, needle in (
    ("--window", "0", "--window must be a whole number >= 2"),
    ("--window", "-4", "--window must be a whole number >= 2"),
    ("--window", "1", "--window must be a whole number >= 2"),
    ("--window", "4096", "need 2 <= window <= 64 (the context)"),
    ("--stride", "0", "--stride must be a whole number >= 1"),
    ("--stride", "-2", "--stride must be a whole number >= 1"),
):
    case(f"perplexity{flag}-{v}", f"{PPL} {flag} {v} --out {{root}}/ppl", needle)
case("perplexity-stride-over-window", f"{PPL} --window 16 --stride 32", "--stride 32 is longer than --window 16")
for task, base in EVALS.items():
    for v in ("0", "-1"):
        case(f"eval-{task}-limit-{v}", f"{base} --limit {v} --out {{root}}/ev", "--limit must be positive")
for flag in ("--max-new-tokens", "--num-beams"):
    for v in ("0", "-2"):
        case(f"eval-seq2seq{flag}-{v}", f"{EVALS['seq2seq']} {flag} {v}", f"{flag} must be a whole number >= 1")
for flag, v, needle in (
    ("--steps", "0", "--steps must be a whole number of at least 1"),
    ("--steps", "-1", "--steps must be a whole number of at least 1"),
    ("--max-steps", "0", "--max-steps must be a whole number of at least --steps (50)"),
    ("--max-steps", "-1", "--max-steps must be a whole number of at least --steps"),
    ("--max-steps", "10", "--max-steps must be a whole number of at least --steps (50)"),
    ("--layer", "99", "layer 99 is out of range: the model has 2 layers"),
    ("--layer", "-3", "layer -3 is out of range"),
):
    case(f"explain{flag}-{v}", f"{EXPLAIN} {flag} {v}", needle)
for v in ("0", "-2", "3"):
    case(
        f"quantize-group-size-{v}",
        f"quantize --model {{dec}} --mode int4 --group-size {v} --out {{root}}/q",
        "--group-size must be an even number >= 2",
    )
case(
    "quantize-group-size-not-dividing",
    "quantize --model {dec} --mode int4 --group-size 128 --out {root}/q",
    "int4 group size 128 does not divide",
)
for v, shown in (("0", "0.0"), ("-0.1", "-0.1"), ("1", "1.0")):
    case(
        f"prune-sparsity-{v}",
        f"prune --model {{dec}} --sparsity {v} --out {{root}}/pruned",
        f"sparsity must be between 0 and 1 (exclusive), got {shown}",
    )
for v in ("0", "-0.5", "1"):
    case(
        f"prune-fraction-{v}",
        f"prune --model {{dec}} --structured heads --fraction {v} --out {{root}}/pruned",
        "fraction of heads or neurons to prune must be",
    )
case("prune-recover-steps--1", f"{PRUNE} --recover-steps -1", "--recover-steps must be a whole number >= 0")
case("prune-recover-steps-without-data", f"{PRUNE} --recover-steps 5", "--recover-steps needs --recover-data")
for v in ("0", "-3"):
    case(
        f"data-shakespeare-qa-per-play-{v}",
        f"data shakespeare-qa --out {{root}}/sqa --per-play {v}",
        "--per-play must be a whole number >= 1",
    )
    case(
        f"data-bible-genres-per-genre-{v}",
        f"data bible-genres --out {{root}}/bg --per-genre {v}",
        "--per-genre must be a whole number >= 1",
    )
case("merge-base-with-uniform", "merge {dec} {dec} --out {root}/mg --base {dec}", "--base applies to task-arithmetic")
case(
    "merge-weights-with-greedy",
    "merge {dec} {dec} --out {root}/mg --method greedy --val-data {corpus} --weights 1,2",
    "greedy picks its own",
)
case("merge-scale-with-uniform", "merge {dec} {dec} --out {root}/mg --scale 0.5", "--scale and --density apply to")
case(
    "merge-density-with-task-arithmetic",
    "merge {dec} {dec} --out {root}/mg --method task-arithmetic --base {dec} --density 0.5",
    "--density applies to ties",
)
case(
    "merge-val-data-with-uniform",
    "merge {dec} {dec} --out {root}/mg --val-data {corpus}",
    "--val-data is what greedy picks",
)
case(
    "merge-text-col-without-data",
    "merge {clf} {clf} --out {root}/mg --text-col text",
    "name the columns of --eval-data",
)
case("merge-one-model", "merge {dec} --out {root}/mg", "merging needs two models or more")
case("merge-two-architectures", "merge {dec} {clf} --out {root}/mg", "not the same architecture")
case(
    "merge-density-0",
    "merge {dec} {dec} --out {root}/mg --method ties --base {dec} --density 0",
    "--density must be in (0, 1]",
)
case("eval-bias-on-an-encoder", "eval bias --model {enc}", "eval bias scores a decoder")
case("eval-bias-data-missing", "eval bias --model {dec} --data {missing}", "data file not found")
case("data-clean-unknown-rule", "data clean {corpus} --out {root}/dc --skip nope", "unknown cleaning rule nope")
case(
    "data-clean-near-threshold-0",
    "data clean {corpus} --out {root}/dc --near-threshold 0",
    "near_threshold (--near-threshold) must be in (0, 1]",
)
case("data-clean-num-perm-1", "data clean {corpus} --out {root}/dc --num-perm 1", "num_perm (--num-perm) must be")
case("data-clean-out-not-empty", "data clean {corpus} --out {keep}", "is not empty; choose a new --out")
case("finetune-classify-stride--1", f"{FT_CLASSIFY} --stride -1", "stride (--stride) must be a whole number >= 0")
case(
    "finetune-classify-stride-over-window",
    f"{FT_CLASSIFY} --max-len 32 --stride 30",
    "stride (--stride) 30 must be below max_len - 2 (30)",
)
for verb, base in (("predict", "predict --model {clf} --text hi"), ("embed", "embed --model {enc} --text hi")):
    for v in ("0", "-1"):
        case(f"{verb}-batch-size-{v}", f"{base} --batch-size {v}", "--batch-size must be a whole number >= 1")
for flag, v in (
    ("--port", "-1"),
    ("--port", "70000"),
    ("--max-batch", "0"),
    ("--max-batch", "-1"),
    ("--max-queue", "-1"),
    ("--max-len", "0"),
    ("--max-len", "-1"),
    ("--max-body", "0"),
    ("--max-body", "-1"),
):
    case(f"serve{flag}-{v}", f"{SERVE} {flag} {v}", f"{flag} must be a whole number")
for v in ("0", "-1"):
    case(f"serve--request-timeout-{v}", f"{SERVE} --request-timeout {v}", "--request-timeout must be > 0")
for key, v, needle in (
    ("train.steps", "0", "train.steps must be a whole number >= 1"),
    ("train.batch_size", "-1", "train.batch_size must be a whole number >= 1"),
    ("train.lr", "0", "train.lr must be > 0"),
    ("model.n_layer", "0", "model.n_layer must be a positive integer"),
    ("data.val_fraction", "0", "data.val_fraction must be in (0, 1)"),
    ("train.seq_len", "-1", "train.seq_len must be a whole number >= 1"),
    ("train.eval_every", "-1", "train.eval_every must be a whole number >= 0"),
):
    case(f"pretrain-set-{key}-{v}", f"pretrain --config {{recipe_yaml}} --out {{root}}/run --set {key}={v}", needle)
for key, v, needle in (
    ("train.steps", "0", "train.steps must be a whole number >= 1"),
    ("train.lr", "-1", "train.lr must be > 0"),
):
    case(f"quickstart-set-{key}-{v}", f"quickstart --out {{root}}/qs --set {key}={v}", needle)
# fine-tuning (train/ and tune/): the message names the setting
for task in FT_BASE:
    for flag in ("--epochs", "--batch-size", "--lr", "--max-len"):
        for v in ("0", "-1"):
            case(f"finetune-{task}{flag}-{v}", f"{ft(task)} {flag} {v}", snake(flag))
for flag, v in (
    ("--lora-r", "0"),
    ("--lora-r", "-1"),
    ("--lora-alpha", "0"),
    ("--lora-alpha", "-1"),
    ("--lora-dropout", "-0.1"),
    ("--lora-dropout", "1"),
):
    case(f"finetune-classify{flag}-{v}", f"{FT_CLASSIFY} --method lora {flag} {v}", snake(flag))
for v in ("0", "-1"):
    case(f"finetune-classify-top-k-{v}", f"{FT_CLASSIFY} --method top-k --top-k {v}", "top_k")
for flag, v in (
    ("--val-fraction", "-0.1"),
    ("--val-fraction", "1"),
    ("--test-fraction", "-0.1"),
    ("--test-fraction", "1"),
):
    case(f"finetune-classify{flag}-{v}", f"{FT_CLASSIFY} {flag} {v}", snake(flag))
for task, flag, v in (
    ("qa", "--stride", "-1"),
    ("chat", "--max-new-tokens", "0"),
    ("chat", "--eval-limit", "0"),
    ("dpo", "--beta", "0"),
    ("dpo", "--beta", "-1"),
    ("grpo", "--group-size", "1"),
    ("grpo", "--max-new-tokens", "0"),
    ("grpo", "--temperature", "0"),
    ("grpo", "--kl-beta", "-1"),
    ("grpo", "--eval-limit", "0"),
    ("seq2seq", "--max-target-len", "0"),
    ("seq2seq", "--num-beams", "0"),
    ("seq2seq", "--eval-limit", "0"),
    ("seq2seq", "--max-new-tokens", "0"),
    ("seq2seq", "--time-budget", "0"),
    ("seq2seq", "--time-budget", "-1"),
):
    case(f"finetune-{task}{flag}-{v}", f"{ft(task)} {flag} {v}", snake(flag))

# --- output paths: an existing file, a path under a file, a place nobody can write ------------------------------
OUT_VERBS = {
    "quickstart": "quickstart --out OUT",
    "tokenizer-train": "tokenizer train --data {corpus} --vocab-size 300 --out OUT",
    "pretrain": "pretrain --config {recipe_yaml} --out OUT",
    "eval-perplexity": PPL + " --out OUT",
    **{f"eval-{t}": b + " --out OUT" for t, b in EVALS.items()},
    "explain": "explain --model {dec} --text hello --out OUT",
    "quantize": "quantize --model {dec} --mode int8 --out OUT",
    "prune": "prune --model {dec} --sparsity 0.5 --out OUT",
    "convert": "convert {dec} OUT",
    "data-shakespeare-qa": "data shakespeare-qa --out OUT",
    "data-chatterbot": "data chatterbot --out OUT",
    "data-clean": "data clean {corpus} --out OUT",
    "merge": "merge {dec} {dec} --out OUT",
    **{f"finetune-{t}": ft(t, out="OUT") for t in FT_BASE},
}
for verb, template in OUT_VERBS.items():
    for kind, where, needle in (
        ("file", "{file}", "notes.txt is a file, not a folder"),
        ("under-a-file", "{under}", "which is a file; choose a path under a folder"),
        ("unwritable", "{proc}", "cannot write in /proc"),
    ):
        case(f"{verb}-out-{kind}", template.replace("OUT", where), needle)
for verb in ("quantize", "prune", "convert"):
    case(
        f"{verb}-out-a-folder-of-other-files",
        OUT_VERBS[verb].replace("OUT", "{keep}"),
        "exists and is not a model directory",
    )
case(
    "tokenizer-train-json-out-under-a-file",
    "tokenizer train --data {corpus} --vocab-size 300 --out {file}/tok.json",
    "notes.txt is a file, not a folder",
)
case(
    "tokenizer-train-json-out-unwritable",
    "tokenizer train --data {corpus} --vocab-size 300 --out {proc}.json",
    "cannot write in /proc",
)
case("pretrain-out-not-empty", "pretrain --config {recipe_yaml} --out {keep}", "is not empty")
case("finetune-classify-out-not-empty", ft("classify", out="{keep}"), "is not empty")
# --resume with a recipe on a folder of someone else's files: refused, and nothing in it deleted (tree unchanged)
case(
    "pretrain-resume-a-folder-of-other-files",
    "pretrain --config {recipe_yaml} --resume --out {keep}",
    "holds no run of lmforge",
)

# --- model paths: nothing, a file, a folder, and damaged model directories -------------------------------------
MODEL_VERBS = {
    "generate": "generate --prompt hi --model MODEL",
    "chat": "chat --prompt hi --model MODEL",
    "eval-perplexity": "eval perplexity --data {corpus} --model MODEL",
    "eval-classify": "eval classify --data {labelled_csv} --model MODEL",
    "explain": "explain --text hello --out {root}/ex --model MODEL",
    "quantize": "quantize --mode int8 --out {root}/q --model MODEL",
    "prune": "prune --sparsity 0.5 --out {root}/pruned --model MODEL",
    "convert": "convert MODEL {root}/conv",
    "export": "export MODEL {root}/m.gguf",
    "predict": "predict --text hi --model MODEL",
    "embed": "embed --text hi --model MODEL",
    "serve": "serve --model MODEL",
    "info": "info MODEL",
    "finetune-classify": "finetune classify --data {labelled_csv} --out {root}/ft --model MODEL",
}
MODEL_KINDS = [
    ("nothing", "{missing}", "does not exist"),
    ("a-text-file", "{file}", "is not a model directory"),
    ("an-empty-folder", "{dir}", "config.json is missing"),
    ("truncated-weights", "{trunc}", "model.safetensors is truncated or corrupt"),
    ("config-of-invalid-bytes", "{badconfig}", "config.json is not valid JSON"),
    ("no-weights", "{noweights}", "has no model.safetensors"),
    ("junk-gguf", "{junk_gguf}", "junk.gguf is truncated or not a GGUF file"),
]
for verb, template in MODEL_VERBS.items():
    for kind, where, needle in MODEL_KINDS:
        if verb == "info" and kind in ("a-text-file", "nothing"):
            needle = "is neither a model directory nor a preset"
        case(f"{verb}-model-{kind}", template.replace("MODEL", where), needle)
case("export-an-encoder", "export {enc} {root}/m.gguf", "GGUF")
case("export-out-not-gguf", "export {dec} {root}/m.bin", "must be a .gguf file")
for verb in ("generate", "info", "predict"):
    case(
        f"{verb}-model-garbage-header",
        MODEL_VERBS[verb].replace("MODEL", "{badheader}"),
        "model.safetensors is truncated or corrupt",
    )
    case(
        f"{verb}-model-weights-are-a-folder",
        MODEL_VERBS[verb].replace("MODEL", "{weightsdir}"),
        "is a folder, not a weights file",
    )
case("info-model-no-config", "info {noconfig}", "config.json is missing")
for verb in ("generate", "info"):
    case(
        f"{verb}-model-missing-shard",
        MODEL_VERBS[verb].replace("MODEL", "{shards}"),
        "shard model-00001-of-00002.safetensors named in model.safetensors.index.json is missing",
    )
case("generate-bad-tokenizer", "generate --prompt hi --model {badtok}", "is not a valid tokenizer.json")
case("predict-decoder-model", "predict --text hi --model {dec}", "needs an encoder model")
case("predict-encoder-without-head", "predict --text hi --model {enc}", "has no classification head")
case("embed-decoder-model", "embed --text hi --model {dec}", "needs an encoder model")
case("eval-perplexity-encoder", "eval perplexity --data {corpus} --model {enc}", "needs a decoder")
case("eval-classify-decoder", "eval classify --data {labelled_csv} --model {dec}", "needs a classifier")
case("eval-qa-classifier", "eval qa --data {squad_json} --model {clf}", "needs an extractive QA model")
case("quantize-bad-mode", "quantize --model {dec} --mode int3 --out {root}/q", "quantization mode 'int3'")

# --- adapters ---------------------------------------------------------------------------------------------------
for verb, base in (("generate", GEN), ("chat", CHAT), ("eval-perplexity", PPL)):
    for kind, where, needle in (
        ("nothing", "{missing}", "no adapter_config.json"),
        ("a-file", "{file}", "no adapter_config.json"),
        ("an-empty-folder", "{dir}", "no adapter_config.json"),
        ("truncated-weights", "{ad_trunc}", "cannot read the adapter"),
        ("no-weights", "{ad_noweights}", "adapter_model.safetensors is missing"),
        ("config-of-invalid-bytes", "{ad_badconfig}", "cannot read the adapter"),
    ):
        case(f"{verb}-adapter-{kind}", f"{base} --adapter {where}", needle)

# --- data paths ---------------------------------------------------------------------------------------------------
TEXT_DATA = [
    ("nothing", "{missing}", "not found"),
    ("not-utf8", "{latin1}", "is not UTF-8 text"),
    ("invalid-bytes", "{garbage_txt}", "is not UTF-8 text"),
    ("blank", "{blank_txt}", "is empty"),
    ("an-empty-folder", "{dir}", "has no text files"),
]
for verb, template in (
    ("tokenizer-train", "tokenizer train --vocab-size 300 --out {root}/tok --data DATA"),
    ("eval-perplexity", "eval perplexity --model {dec} --out {root}/ppl --data DATA"),
    ("quantize-eval-data", "quantize --model {dec} --mode int8 --out {root}/q --eval-data DATA"),
    ("prune-recover-data", PRUNE + " --recover-steps 2 --recover-data DATA"),
    ("pretrain-sources", "pretrain --config {recipe_yaml} --out {root}/run --set data.sources=DATA"),
):
    for kind, where, needle in TEXT_DATA:
        case(f"{verb}-data-{kind}", template.replace("DATA", where), needle)
LABELLED = [
    ("nothing", "{missing}", "data file not found"),
    ("a-folder", "{dir}", "is a folder, not a data file"),
    ("header-only", "{header_only_csv}", "has a header but no rows"),
    ("no-text-column", "{nolabel_csv}", "no text column found"),
    ("malformed-jsonl", "{bad_jsonl}", "not a JSON object per line"),
    ("invalid-bytes", "{garbage_bin}", "unknown data format"),
]
for verb, template in (
    ("eval-classify", "eval classify --model {clf} --out {root}/ev --data DATA"),
    ("predict", "predict --model {clf} DATA"),
    ("embed", "embed --model {enc} DATA"),
    ("finetune-classify", ft("classify", data="DATA")),
    ("finetune-classify-val-data", FT_CLASSIFY + " --val-data DATA"),
    ("finetune-classify-test-data", FT_CLASSIFY + " --test-data DATA"),
):
    for kind, where, needle in LABELLED:
        case(f"{verb}-data-{kind}", template.replace("DATA", where), needle)
case("predict-txt-input-missing", "predict --model {clf} {missing}.txt", "file not found")
case("predict-txt-input-blank", "predict --model {clf} {blank_txt}", "no text to read")
case("embed-txt-input-a-folder", "embed --model {enc} {txtdir}", "is a folder; give a text file")
case(
    "predict-unknown-labels",
    "predict --model {clf} {unknown_labels_csv} --label-col label",
    "has labels the model never saw: maybe",
)
case(
    "eval-classify-unknown-labels",
    "eval classify --model {clf} --data {unknown_labels_csv}",
    "has labels the model never saw",
)
case(
    "eval-classify-missing-label-col",
    "eval classify --model {clf} --data {labelled_csv} --label-col nope",
    "has no column 'nope'",
)
for id_, task, model, where, needle in (
    ("nothing", "qa", "{qa}", "{missing}", "not found"),
    ("invalid-json", "qa", "{qa}", "{bad_tsv_json}", "bad.tsv.json"),
    ("nothing", "choice", "{dec}", "{missing}", "does not exist"),
    ("malformed-jsonl", "choice", "{dec}", "{bad_jsonl}", "bad.jsonl"),
    ("nothing", "seq2seq", "{dec}", "{missing}", "not found"),
    ("no-source-column", "seq2seq", "{dec}", "{nolabel_csv}", "source"),
    ("a-folder", "qa", "{qa}", "{dir}", "empty_dir is a folder"),
    ("a-folder", "choice", "{dec}", "{dir}", "empty_dir is a folder"),
    ("a-folder", "seq2seq", "{dec}", "{dir}", "empty_dir is a folder"),
):
    case(f"eval-{task}-data-{id_}", f"eval {task} --model {model} --data {where}", needle)
for task, needle in (
    ("qa", "not found"),
    ("chat", "does not exist"),
    ("dpo", "does not exist"),
    ("grpo", "does not exist"),
    ("seq2seq", "not found"),
):
    case(f"finetune-{task}-data-nothing", ft(task, data="{missing}"), needle)
    case(f"finetune-{task}-data-invalid-bytes", ft(task, data="{garbage_bin}"), "garbage.bin")
    case(f"finetune-{task}-data-a-folder", ft(task, data="{dir}"), "empty_dir")

# --- recipes --------------------------------------------------------------------------------------------------------
for verb, template, absent in (
    ("pretrain", "pretrain --out {root}/run --config DATA", "config file not found"),
    ("finetune-classify", FT_CLASSIFY + " --config DATA", "config file not found"),
):
    for kind, where, needle in (
        ("nothing", "{missing}", absent),
        ("a-folder", "{dir}", "is a folder"),
        ("invalid-bytes", "{garbage_yaml}", "garbage.yaml"),
        ("a-list", "{list_yaml}", "list.yaml"),
    ):
        case(f"{verb}-config-{kind}", template.replace("DATA", where), needle)
case("finetune-recipe-negative-lr", FT_CLASSIFY + " --config {ft_yaml}", "lr")

# --- issue 20 -------------------------------------------------------------------------------------------------------
case(
    "pretrain-one-line-corpus",
    "pretrain --config {oneline_yaml} --out {root}/run",
    "is one file with 1 line of text (200,000 characters)",
)
case("info-truncated-weights-says-the-sizes", "info {trunc}", "bytes where its header describes")
case(
    "eval-perplexity-window-0-fails-first",
    "eval perplexity --model {missing} --data {corpus} --window 0",
    "--window must be a whole number >= 2, got 0",
)
case(
    "eval-perplexity-out-checked-before-the-model",
    "eval perplexity --model {missing} --data {corpus} --out {file}",
    "is a file, not a folder",
)
case(
    "predict-batch-size-before-the-model",
    "predict --model {missing} --text hi --batch-size -1",
    "--batch-size must be a whole number >= 1",
)
case("generate-bad-flag-before-the-model", "generate --model {missing} --prompt hi --top-p 0", "--top-p")
case("chat-bad-flag-before-the-model", "chat --model {missing} --prompt hi --top-k 0", "--top-k")
case("explain-empty-text", "explain --model {dec} --text '' --out {root}/ex", "the text to explain is empty")


# --- issue 35: a flag where it does not apply is refused, not accepted and ignored ------------------------------------
# (each id here is named by SCOPE below, the walk over every verb's flags)
case("generate-beams-with-top-k", GEN + " --num-beams 2 --top-k 5", "top_k do not apply to it")
case("generate-beams-with-temperature", GEN + " --num-beams 2 --temperature 0.7", "temperature do not apply")
case("generate-beams-with-speculative", GEN + " --num-beams 2 --speculative ngram", "a drafter do not apply")
case(
    "generate-more-sequences-than-beams",
    GEN + " --num-beams 2 --num-return-sequences 3",
    "num_return_sequences (3) must be between 1 and num_beams (2)",
)
case("generate-length-penalty-without-beams", GEN + " --length-penalty 2", "--length-penalty")
case("generate-early-stopping-without-beams", GEN + " --early-stopping true", "--early-stopping")
case("generate-stream-two-prompts", GEN + " --prompt there --stream", "several --prompt")
case("generate-stream-json", GEN + " --stream --json", "--json")
case("generate-stream-no-stream", GEN + " --stream --no-stream", "--no-stream")
case("generate-stream-beams", GEN + " --stream --num-beams 2", "beam search")
case("generate-regex-invalid", GEN + " --regex ([", "unsupported constraint")
case(
    "generate-quantize-a-quantized-model",
    "generate --model {q8} --prompt hi --quantize int4",
    "is already quantized (int8)",
)
case("eval-seq2seq-chat-on-t5", "eval seq2seq --model {s2s} --data {pairs_jsonl} --chat", "drop --chat")
case("explain-attention-with-steps", EXPLAIN + " --what attention --steps 10", "--steps set the saliency")
case("explain-attention-with-method", EXPLAIN + " --what attention --method grad_x_input", "--method set")
case("explain-attention-with-baseline", EXPLAIN + " --what attention --baseline zero", "--baseline set")
case("explain-attention-with-max-steps", EXPLAIN + " --what attention --max-steps 80", "--max-steps set")
case("explain-attention-with-target", EXPLAIN + " --what attention --target id:3", "--target picks")
case("explain-saliency-with-layer", EXPLAIN + " --what saliency --layer 0", "--layer picks")
case("explain-grad-x-input-with-steps", EXPLAIN + " --method grad_x_input --steps 5", "grad_x_input has none")
case("explain-t5-with-method", "explain --model {s2s} --text hello --out {root}/ex --method ig", "not encoder-decoders")
case(
    "quantize-int8-with-group-size",
    "quantize --model {dec} --mode int8 --group-size 32 --out {root}/q",
    "--group-size sets int4's groups",
)
case(
    "quantize-text-col-on-a-decoder",
    "quantize --model {dec} --mode int8 --out {root}/q --eval-data {corpus} --text-col text",
    "--text-col name the columns",
)
case(
    "quantize-label-col-without-eval-data",
    "quantize --model {clf} --mode int8 --out {root}/q --label-col label",
    "give --eval-data",
)
case(
    "quantize-classifier-two-eval-files",
    "quantize --model {clf} --mode int8 --out {root}/q --eval-data {labelled_csv} {labelled_csv}",
    "one labelled --eval-data file, got 2",
)
case("prune-fraction-with-sparsity", PRUNE + " --fraction 0.5", "--fraction is the share")
case("prune-recover-data-without-steps", PRUNE + " --recover-data {corpus}", "give --recover-steps")
case("predict-file-and-text", "predict {texts_txt} --model {clf} --text hi", "not both")
case("predict-text-col-with-text", "predict --model {clf} --text hi --text-col t", "--text-col names")
case(
    "predict-label-col-with-text",
    "predict {labelled_csv} --model {clf} --text hi --label-col label",
    "--label-col scores",
)
case("predict-vote-with-one-model", "predict --model {clf} --text hi --vote majority", "--vote combines")
case("embed-file-and-text", "embed {texts_txt} --model {enc} --text hi", "not both")
case("embed-text-col-with-text", "embed --model {enc} --text hi --text-col t", "--text-col names")
case(
    "serve-engine-flags-for-an-encoder",
    "serve --model {enc} --port 0 --max-batch 4 --prefill-chunk 8 --kv-dtype bfloat16",
    "--max-batch, --prefill-chunk, --kv-dtype set the decoders' engine",
)
case(
    "tokenizer-train-cased-bpe",
    "tokenizer train --data {corpus} --kind bpe --cased --vocab-size 300 --out {root}/tok",
    "--cased is WordPiece's setting",
)
case(
    "pretrain-nsp-with-span",
    "pretrain --config {recipe_yaml} --out {root}/run --set train.objective=span --set train.nsp=true",
    "train.nsp and train.whole_word_mask belong to the mlm objective",
)
case("convert-into-itself", "convert {dec} {dec}", "is the model being converted")
case("finetune-top-k-with-lora", FT_CLASSIFY + " --method lora --top-k 3", "--top-k applies to --method top-k")
for flag in ("--lora-r 4", "--lora-alpha 4", "--lora-dropout 0.1", "--lora-targets mlp"):
    case(
        f"finetune-{flag.split()[0][2:]}-with-full",
        FT_CLASSIFY + " " + flag,
        f"{flag.split()[0]} applies to --method lora or qlora",
    )
case("finetune-quant-with-lora", FT_CLASSIFY + " --method lora --quant int4", "--quant applies to --method qlora")
case("finetune-label-smoothing-for-chat", ft("chat") + " --label-smoothing 0.1", "applies to finetune classify")
case("finetune-augment-for-chat", ft("chat") + " --augment 0.1", "--augment applies to finetune classify")
case(
    "finetune-augment-ops-without-augment",
    FT_CLASSIFY + " --augment-ops swap",
    "--augment-ops applies to finetune classify --augment",
)
case(
    "finetune-augment-ops-unknown",
    FT_CLASSIFY + " --augment 0.1 --augment-ops shout",
    "augment_ops (--augment-ops) takes",
)
case("finetune-augment-too-high", FT_CLASSIFY + " --augment 0.9", "augment (--augment) must be")
case("finetune-teacher-for-chat", ft("chat") + " --teacher {dec}", "--teacher applies to finetune classify")
case("finetune-mixup-for-chat", ft("chat") + " --mixup 0.2", "--mixup applies to finetune classify")
case(
    "finetune-backtranslate-for-chat",
    ft("chat") + " --backtranslate a,b",
    "--backtranslate applies to finetune classify",
)
case(
    "finetune-transfer-data-without-teacher",
    FT_CLASSIFY + " --transfer-data {labelled_csv}",
    "--transfer-data applies to finetune classify --teacher",
)
for flag in ("--distill-alpha 0.3", "--distill-temperature 3"):
    case(
        f"finetune-{flag.split()[0][2:]}-without-teacher",
        FT_CLASSIFY + " " + flag,
        f"{flag.split()[0]} applies to finetune classify --teacher",
    )
case("finetune-keep-layers-for-chat", ft("chat") + " --keep-layers 1", "--keep-layers applies to the encoder tasks")
case("finetune-keep-layers-too-many", FT_CLASSIFY + " --keep-layers 99", "is more than the model's")
case(
    "distill-student-layers-with-a-causal-lm",
    "distill --teacher {dec} --data {corpus} --student-layers 2 --out {root}/kd",
    "--student-layers cuts down an encoder teacher",
)
case(
    "distill-top-k-with-a-classifier",
    "distill --teacher {clf} --data {labelled_csv} --student-layers 1 --top-k 8 --out {root}/kd",
    "--top-k applies to a causal-LM teacher",
)
case("distill-from-an-encoder", "distill --teacher {enc} --data {labelled_csv} --out {root}/kd", "distills from a")
case("distill-alpha-too-high", "distill --teacher {dec} --data {corpus} --alpha 2 --out {root}/kd", "distill_alpha")
for flag in ("--plateau-patience 3", "--plateau-factor 0.3"):
    case(f"finetune-{flag.split()[0][2:]}-with-linear", FT_CLASSIFY + " " + flag, "applies to --schedule plateau")
case(
    "finetune-min-delta-alone",
    FT_CLASSIFY + " --min-delta 0.01",
    "--min-delta applies to --early-stopping or --schedule plateau",
)
case("finetune-early-stopping-negative", FT_CLASSIFY + " --early-stopping -1", "early_stopping (--early-stopping)")
case(
    "pretrain-early-stopping-without-eval",
    "pretrain --set train.early_stopping=2 --set train.eval_every=0 --out {root}/pe",
    "train.early_stopping needs validation",
)
case("finetune-metric-not-reported", FT_CLASSIFY + " --metric f1", "metric 'f1' is not one finetune classify")
case("finetune-qa-metric-accuracy", ft("qa") + " --metric accuracy", "choose one of f1, exact_match")
case("finetune-chat-metric-accuracy", ft("chat") + " --metric accuracy", "choose one of neg_loss")
case(
    "finetune-val-fraction-with-val-data",
    FT_CLASSIFY + " --val-data {labelled_csv} --val-fraction 0.2",
    "--val-fraction applies to a --data split",
)
case(
    "finetune-test-fraction-with-test-data",
    ft("seq2seq") + " --test-data {pairs_jsonl} --test-fraction 0.2",
    "--test-fraction applies to a --data split",
)
case(
    "finetune-qa-builtin-with-val-data",
    "finetune qa --model {enc} --out {root}/ft --data shakespeare-qa --val-data {squad_json}",
    "shakespeare-qa brings its own",
)


def argv_of(template: str, w: dict[str, str]) -> list[str]:
    return ["" if part == "''" else part for part in template.format(**w).split(" ")]


@pytest.mark.parametrize("argv, needle", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input(w, argv, needle, capsys):
    before = tree(w["root"])
    try:
        proc = call_cli(capsys, *argv_of(argv, w))
        one_line_error(proc, needle)
        assert tree(w["root"]) == before  # nothing created, changed or left behind
    finally:  # a case that failed must not leave its output to the cases after it
        for left in sorted(set(tree(w["root"])) - set(before), reverse=True):
            shutil.rmtree(left) if Path(left).is_dir() and not Path(left).is_symlink() else Path(left).unlink()


ARGPARSE_CASES = [
    (
        "generate-max-new-tokens-not-a-number",
        "generate --model {dec} --prompt hi --max-new-tokens ten",
        "invalid int value: 'ten'",
    ),
    (
        "eval-perplexity-window-a-fraction",
        "eval perplexity --model {dec} --data {corpus} --window 1.5",
        "invalid int value: '1.5'",
    ),
    ("predict-vote-unknown", "predict --model {clf} --text hi --vote loudest", "invalid choice: 'loudest'"),
    (
        "explain-what-unknown",
        "explain --model {dec} --text hi --out {root}/ex --what everything",
        "invalid choice: 'everything'",
    ),
    ("quantize-without-out", "quantize --model {dec} --mode int8", "the following arguments are required: --out"),
    ("finetune-without-task", "finetune", "the following arguments are required: TASK"),
    ("serve-quantize-unknown", "serve --model {dec} --quantize int2", "invalid choice: 'int2'"),
    (
        "prune-structured-unknown",
        "prune --model {dec} --structured layers --fraction 0.5 --out {root}/p",
        "invalid choice: 'layers'",
    ),
]


@pytest.mark.parametrize("argv, needle", [pytest.param(a, n, id=i) for i, a, n in ARGPARSE_CASES])
def test_usage_errors(w, argv, needle, capsys):
    before = tree(w["root"])
    proc = call_cli(capsys, *argv_of(argv, w))
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines[0].startswith("usage: lmforge") and ": error: " in lines[-1] and needle in lines[-1], proc.stderr
    assert tree(w["root"]) == before


def test_case_count():
    assert len(CASES) + len(ARGPARSE_CASES) >= 200, len(CASES) + len(ARGPARSE_CASES)
    assert len({i for i, _, _ in CASES}) == len(CASES)  # ids are unique
    assert len(ARGPARSE_CASES) < len(CASES) / 10  # the library's own checks are the point


def test_a_real_process_exits_2_with_one_line(w):
    """One case through a subprocess: the exit status and stderr of a real `lmforge` process."""
    proc = run_cli("info", w["trunc"])
    one_line_error(proc, "model.safetensors is truncated or corrupt")
    assert proc.stdout == ""


# --- issue 20, item 8: input repaired from non-UTF-8 bytes is counted on stderr, once -----------------------------


@pytest.mark.parametrize("verb, model", [("predict", "clf"), ("embed", "enc")])
@pytest.mark.parametrize("suffix", [".txt", ".csv"])
def test_repaired_input_is_reported(w, verb, model, suffix, tmp_path, capsys):
    f = tmp_path / f"mixed{suffix}"
    rows = [
        b"fine text",
        "Google\u2019s caf\u00e9".encode("mac_roman", errors="replace"),
        b"also fine",
        "na\u00efve".encode("latin-1"),
    ]
    f.write_bytes((b"text\n" if suffix == ".csv" else b"") + b"\n".join(rows) + b"\n")
    proc = call_cli(capsys, verb, "--model", w[model], str(f))
    assert proc.returncode == 0, proc.stderr
    notes = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert notes == [
        f"lmforge: {f}: 2 rows repaired from non-UTF-8 bytes (decoded with a legacy single-byte encoding)"
    ], proc.stderr
    assert len(proc.stdout.splitlines()) == 4
    clean = tmp_path / f"clean{suffix}"
    clean.write_bytes((b"text\n" if suffix == ".csv" else b"") + b"fine text\nalso fine\n")
    assert call_cli(capsys, verb, "--model", w[model], str(clean)).stderr == ""


# --- issue 35: where a flag has no effect in a combination that is reasonable to ask for, a one-line note says so
NOTES = [
    (
        "generate-greedy-with-top-k",
        GEN + " --temperature 0 --top-k 5 --max-new-tokens 2",
        "--top-k has no effect at --temperature 0",
    ),
    (
        "generate-greedy-with-seed",
        GEN + " --temperature 0 --seed 3 --top-p 0.5 --max-new-tokens 2",
        "--top-p, --seed have no effect at --temperature 0",
    ),
    ("chat-reply-longer-than-the-context", CHAT + " --temperature 0", "the reply gets at most"),
    (
        "quantize-eval-data-for-an-encoder",
        "quantize --model {enc} --mode int8 --out {root}/q --eval-data {corpus}",
        "--eval-data skipped",
    ),
    ("finetune-max-len-past-the-window", FT_CLASSIFY + " --max-len 100", "--max-len 100 is past the model's window"),
    ("finetune-strategy-in-one-process", FT_CLASSIFY + " --strategy ddp", "applies under torchrun"),
]


@pytest.mark.parametrize("argv, needle", [pytest.param(a, n, id=i) for i, a, n in NOTES])
def test_note_where_a_flag_has_no_effect(w, argv, needle, capsys):
    before = tree(w["root"])
    try:
        proc = call_cli(capsys, *argv_of(argv, w))
        assert proc.returncode == 0, proc.stderr[-3000:]
        notes = [ln for ln in proc.stderr.splitlines() if needle in ln]
        assert len(notes) == 1 and "note" in notes[0], proc.stderr[-3000:]
    finally:
        for left in sorted(set(tree(w["root"])) - set(before), reverse=True):
            shutil.rmtree(left) if Path(left).is_dir() and not Path(left).is_symlink() else Path(left).unlink()


# Every flag of every verb, and where it applies: "all" (every model and input the verb takes; a model of a family
# the verb does not take is refused by the verb itself), or the ids of the cases above that show what happens
# outside its scope (refused with one line, or a note). A flag added without a place here fails the walk.
ALL = "all"
MODEL = {
    "--model": ALL,
    "--device": ALL,
    "--dtype": ALL,
    "--quantize": ["generate-quantize-a-quantized-model"],
    "--adapter": ALL,
}
SCOPE: dict[str, dict[str, object]] = {
    "quickstart": {"--out": ALL, "--device": ALL, "--set": ALL},
    "tokenizer train": {
        "--data": ALL,
        "--vocab-size": ALL,
        "--kind": ALL,
        "--cased": ["tokenizer-train-cased-bpe"],
        "--out": ALL,
    },
    "pretrain": {"--config": ALL, "--set": ["pretrain-nsp-with-span"], "--out": ALL, "--resume": ALL, "--device": ALL},
    "generate": {
        **MODEL,
        "--prompt": ALL,
        "--max-new-tokens": ALL,
        "--temperature": ["generate-beams-with-temperature"],
        "--top-k": ["generate-beams-with-top-k", "generate-greedy-with-top-k"],
        "--top-p": ["generate-greedy-with-seed"],
        "--repetition-penalty": ALL,
        "--seed": ["generate-greedy-with-seed"],
        "--compile": ALL,
        "--speculative": ["generate-beams-with-speculative"],
        "--num-beams": ALL,
        "--length-penalty": ["generate-length-penalty-without-beams"],
        "--early-stopping": ["generate-early-stopping-without-beams"],
        "--num-return-sequences": ["generate-more-sequences-than-beams"],
        "--stop": ALL,
        "--escapes": ALL,
        "--stream": ["generate-stream-two-prompts", "generate-stream-json", "generate-stream-beams"],
        "--no-stream": ["generate-stream-no-stream"],
        "--json": ALL,
        "--json-schema": ALL,
        "--regex": ["generate-regex-invalid"],
    },
    "convert": {"source": ["convert-into-itself"], "out": ALL},
    "export": {"model": ["export-an-encoder"], "out": ["export-out-not-gguf"], "--type": ALL, "--adapter": ALL},
    "chat": {
        **MODEL,
        "--system": ALL,
        "--prompt": ALL,
        "--max-new-tokens": ["chat-reply-longer-than-the-context"],
        "--temperature": ALL,
        "--top-k": ALL,
        "--top-p": ALL,
        "--seed": ALL,
        "--compile": ALL,
        "--speculative": ALL,
    },
    "eval perplexity": {**MODEL, "--data": ALL, "--window": ALL, "--stride": ALL, "--out": ALL, "--json": ALL},
    "eval classify": {
        **MODEL,
        "--out": ALL,
        "--limit": ALL,
        "--json": ALL,
        "--data": ALL,
        "--text-col": ALL,
        "--label-col": ALL,
    },
    "eval qa": {**MODEL, "--out": ALL, "--limit": ALL, "--json": ALL, "--data": ALL},
    "eval choice": {
        **MODEL,
        "--out": ALL,
        "--limit": ALL,
        "--json": ALL,
        "--data": ALL,
        "--chat": ALL,
        "--prompt": ALL,
    },
    "eval bias": {**MODEL, "--out": ALL, "--limit": ALL, "--json": ALL, "--data": ALL},
    "eval seq2seq": {
        **MODEL,
        "--out": ALL,
        "--limit": ALL,
        "--json": ALL,
        "--data": ALL,
        "--source-col": ALL,
        "--target-col": ALL,
        "--prompt": ALL,
        "--chat": ["eval-seq2seq-chat-on-t5"],
        "--max-new-tokens": ALL,
        "--num-beams": ALL,
    },
    "explain": {
        "--model": ALL,
        "--text": ALL,
        "--out": ALL,
        "--what": ALL,
        "--device": ALL,
        "--method": ["explain-attention-with-method", "explain-t5-with-method"],
        "--steps": ["explain-attention-with-steps", "explain-grad-x-input-with-steps"],
        "--max-steps": ["explain-attention-with-max-steps"],
        "--baseline": ["explain-attention-with-baseline"],
        "--target": ["explain-attention-with-target"],
        "--layer": ["explain-saliency-with-layer"],
    },
    "quantize": {
        "--model": ALL,
        "--mode": ALL,
        "--group-size": ["quantize-int8-with-group-size"],
        "--device": ALL,
        "--out": ALL,
        "--eval-data": ["quantize-classifier-two-eval-files", "quantize-eval-data-for-an-encoder"],
        "--text-col": ["quantize-text-col-on-a-decoder"],
        "--label-col": ["quantize-label-col-without-eval-data"],
    },
    "prune": {
        "--model": ALL,
        "--sparsity": ALL,
        "--structured": ALL,
        "--fraction": ["prune-fraction-with-sparsity"],
        "--device": ALL,
        "--recover-steps": ALL,
        "--recover-data": ["prune-recover-data-without-steps"],
        "--out": ALL,
        "--eval-data": ["quantize-eval-data-for-an-encoder"],
        "--text-col": ["quantize-text-col-on-a-decoder"],
        "--label-col": ["quantize-label-col-without-eval-data"],
    },
    "data shakespeare-qa": {"--per-play": ALL, "--out": ALL, "--seed": ALL},
    "data chatterbot": {"--pairs": ALL, "--out": ALL, "--seed": ALL},
    "data bible-genres": {"--per-genre": ALL, "--out": ALL, "--seed": ALL},
    "merge": {
        "models": ALL,
        "--out": ALL,
        "--method": ALL,
        "--base": ["merge-base-with-uniform"],
        "--weights": ["merge-weights-with-greedy"],
        "--scale": ["merge-scale-with-uniform"],
        "--density": ["merge-density-with-task-arithmetic"],
        "--val-data": ["merge-val-data-with-uniform"],
        "--eval-data": ALL,
        "--text-col": ["merge-text-col-without-data"],
        "--label-col": ["merge-text-col-without-data"],
        "--device": ALL,
    },
    "distill": {
        "--teacher": ALL,
        "--data": ALL,
        "--out": ALL,
        "--student": ALL,
        "--student-layers": ["distill-student-layers-with-a-causal-lm"],
        "--alpha": ALL,
        "--temperature": ALL,
        "--top-k": ["distill-top-k-with-a-classifier"],
        "--set": ALL,
        "--device": ALL,
        "--resume": ALL,
    },
    "data clean": {
        f: ALL
        for f in (
            "sources",
            "--out",
            "--skip",
            "--enable",
            *(
                f"--{n}"
                for n in (
                    "min-words",
                    "max-words",
                    "min-word-length",
                    "max-word-length",
                    "max-symbol-ratio",
                    "max-digit-ratio",
                    "min-alpha-words",
                    "min-stop-words",
                    "max-bullet-lines",
                    "max-ellipsis-lines",
                    "max-dup-lines",
                    "max-dup-line-chars",
                    "max-dup-paragraphs",
                    "max-dup-paragraph-chars",
                    "min-line-words",
                    "near-threshold",
                    "num-perm",
                )
            ),
        )
    },
    "predict": {
        "input": ["predict-file-and-text"],
        "--model": ALL,
        "--vote": ["predict-vote-with-one-model"],
        "--text": ["predict-file-and-text", "predict-label-col-with-text"],
        "--text-col": ["predict-text-col-with-text"],
        "--label-col": ["predict-label-col-with-text"],
        "--batch-size": ALL,
        "--device": ALL,
        "--dtype": ALL,
        "--quantize": ALL,
        "--json": ALL,
    },
    "embed": {
        "input": ["embed-file-and-text"],
        "--model": ALL,
        "--device": ALL,
        "--dtype": ALL,
        "--quantize": ALL,
        "--text": ["embed-file-and-text"],
        "--text-col": ["embed-text-col-with-text"],
        "--similarity": ALL,
        "--batch-size": ALL,
    },
    "serve": {
        "--model": ALL,
        "--host": ALL,
        "--port": ALL,
        "--api-key": ALL,
        **{
            f: ["serve-engine-flags-for-an-encoder"]
            for f in (
                "--max-batch",
                "--max-queue",
                "--max-len",
                "--cache-mb",
                "--prefill-chunk",
                "--speculative",
                "--kv-dtype",
            )
        },
        "--quantize": ALL,
        "--dtype": ALL,
        "--device": ALL,
        "--max-body": ALL,
        "--request-timeout": ALL,
        "--log-level": ALL,
    },
    "info": {"target": ALL, "--json": ALL},
}
# finetune: the settings that apply only to some methods or tasks are lmforge.tune.recipe.APPLIES (every other
# setting applies to every run of the task); each has its case
FINETUNE_CASES = {
    "top_k": "finetune-top-k-with-lora",
    "lora_r": "finetune-lora-r-with-full",
    "lora_alpha": "finetune-lora-alpha-with-full",
    "lora_dropout": "finetune-lora-dropout-with-full",
    "lora_targets": "finetune-lora-targets-with-full",
    "quant": "finetune-quant-with-lora",
    "label_smoothing": "finetune-label-smoothing-for-chat",
    "augment": "finetune-augment-for-chat",
    "augment_ops": "finetune-augment-ops-without-augment",
    "teacher": "finetune-teacher-for-chat",
    "mixup": "finetune-mixup-for-chat",
    "backtranslate": "finetune-backtranslate-for-chat",
    "transfer_data": "finetune-transfer-data-without-teacher",
    "distill_alpha": "finetune-distill-alpha-without-teacher",
    "distill_temperature": "finetune-distill-temperature-without-teacher",
    "keep_layers": "finetune-keep-layers-for-chat",
    "plateau_patience": "finetune-plateau-patience-with-linear",
    "plateau_factor": "finetune-plateau-factor-with-linear",
    "min_delta": "finetune-min-delta-alone",
    "val_fraction": "finetune-val-fraction-with-val-data",
    "test_fraction": "finetune-test-fraction-with-test-data",
}


def _verbs(parser, path=()):
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield (
            " ".join(path),
            [
                a.option_strings[-1] if a.option_strings else a.dest
                for a in parser._actions
                if not isinstance(a, argparse._HelpAction)
            ],
        )
        return
    for name, sub in subs[0].choices.items():
        yield from _verbs(sub, (*path, name))


def test_every_flag_of_every_verb_has_a_scope():
    """The walk: every verb's every flag is declared as applying everywhere, or has the cases that show it refused
    (or noted) where it does not apply; every case named exists."""
    from lmforge.cli import build_parser
    from lmforge.tune.recipe import APPLIES

    ids = {i for i, _, _ in CASES} | {i for i, _, _ in NOTES}
    seen = set()
    for verb, flags in _verbs(build_parser()):
        if verb.startswith("finetune "):
            continue
        seen.add(verb)
        assert verb in SCOPE, f"lmforge {verb} has no SCOPE entry"
        assert sorted(flags) == sorted(SCOPE[verb]), (verb, sorted(set(flags) ^ set(SCOPE[verb])))
        for flag, where in SCOPE[verb].items():
            assert where == ALL or (where and set(where) <= ids), (verb, flag, where)
    assert seen == set(SCOPE)
    assert set(APPLIES) == set(FINETUNE_CASES) and set(FINETUNE_CASES.values()) <= ids
