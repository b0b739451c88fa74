"""Beam search for decoders: the same hypotheses as transformers' `generate(num_beams=...)` on the same weights
(length penalty, early stopping, several returned), through the Python API, `generate --num-beams` and
`eval seq2seq --num-beams`; settings that do not apply to beam search are refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from conftest import call_cli, tiny_config
from lmforge.errors import LmforgeError
from lmforge.generate import generate
from lmforge.generate.beam import BeamParams, decoder_beam_search
from lmforge.models.decoder import DecoderLM

EOS = 3


def _model(style: str, seed: int, eos: bool = True) -> DecoderLM:
    torch.manual_seed(seed)
    m = DecoderLM(tiny_config(style, vocab_size=64, max_seq_len=64)).eval()
    with torch.no_grad():  # spread the logits (no near-ties between beams) and make EOS likely enough to end some
        w = m.lm_head.weight
        w.mul_(6)
        if not eos:
            return m
        if getattr(m.norm, "bias", None) is not None:  # GPT-2's LayerNorm centres h: raise EOS through its bias
            m.norm.bias += 3.5 * w[EOS] / w[EOS].dot(w[EOS])
        else:
            w[EOS] += 0.5
    return m


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=4),
        dict(num_beams=4, length_penalty=0.6),
        dict(num_beams=3, early_stopping=True, num_return_sequences=2),
        dict(num_beams=4, length_penalty=2.0, early_stopping="never", num_return_sequences=4),
    ],
    ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()),
)
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_beam_search_equals_transformers_generate(tmp_path, style, kw):
    kw = {"num_return_sequences": kw["num_beams"], **kw}  # every hypothesis kept, unless the case says fewer
    ended, total = 0, 0
    for seed in range(3):
        m = _model(style, seed)
        m.save_pretrained(tmp_path / str(seed))
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / str(seed)).eval()
        prompt = torch.randint(4, 64, (1, 5 + seed), generator=torch.Generator().manual_seed(seed)).tolist()[0]
        with torch.inference_mode():
            ours, _ = decoder_beam_search(m, prompt, 12, BeamParams(**kw), [EOS], pad=0)
            theirs = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=0,
                **kw,
            )
        for a, b in zip(ours, theirs[:, len(prompt) :].tolist()):
            b = b[: b.index(EOS) + 1] if EOS in b else b
            assert a == b, (seed, a, b)
            ended += EOS in a
            total += 1
    assert total == 3 * kw["num_return_sequences"] and ended > 0  # (some hypotheses end with EOS)


class _Chars:
    """A character tokenizer: ids 4.. are characters, 3 is EOS."""

    eos_id, bos_id, pad_id = EOS, None, 0

    def encode(self, text):
        return [4 + (ord(ch) % 60) for ch in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + (i - 4) % 26) if i >= 4 else "" for i in ids)


def test_generate_api_beams_stop_strings_and_refusals():
    tok, m = _Chars(), _model("llama", 0, eos=False)
    best = generate(m, tok, ["hello", "beam"], max_new_tokens=10, num_beams=4)
    top3 = generate(m, tok, "hello", max_new_tokens=10, num_beams=4, num_return_sequences=3)
    assert isinstance(best, list) and len(best) == 2 and top3[0] == best[0] and len(set(top3)) == 3
    stop = best[0][2:4]  # a stop string that occurs in the best text ends the hypothesis there
    cut = generate(m, tok, "hello", max_new_tokens=10, num_beams=4, stop=[stop])
    assert stop not in cut and len(cut) <= best[0].index(stop) + 1
    for bad in (dict(temperature=0.7), dict(top_k=5), dict(seed=1), dict(regex="a+"), dict(compile=True)):
        with pytest.raises(LmforgeError, match="beam search"):
            generate(m, tok, "hello", max_new_tokens=5, num_beams=3, **bad)
    with pytest.raises(LmforgeError, match="num_return_sequences"):
        generate(m, tok, "hello", max_new_tokens=5, num_beams=2, num_return_sequences=3)


def test_cli_generate_and_eval_seq2seq_take_num_beams_on_a_decoder(tmp_path, capsys):
    """--num-beams is honoured for decoders: generate prints the beam result (the API's), eval seq2seq scores
    beam outputs that differ from greedy ones; a sampling flag beside it is refused with one line."""
    from lmforge.data.vocab import train_tokenizer
    from lmforge.generate import generate as api
    from lmforge.interop import load_pretrained

    d = tmp_path / "m"
    tok = train_tokenizer(["shakespeare"], vocab_size=300, out=tmp_path / "tok")
    m = DecoderLM(tiny_config("gpt2", vocab_size=tok.vocab_size, max_seq_len=64)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(6)
    m.save_pretrained(d, tokenizer=tok)
    model, tk = load_pretrained(str(d))
    want = api(model, tk, "To be", max_new_tokens=12, num_beams=3)
    r = call_cli(
        capsys,
        "generate",
        "--model",
        str(d),
        "--prompt",
        "To be",
        "--max-new-tokens",
        "12",
        "--num-beams",
        "3",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["text"] == want
    r = call_cli(capsys, "generate", "--model", str(d), "--prompt", "To be", "--num-beams", "3", "--top-k", "5")
    assert r.returncode == 2 and "beam search" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": s, "target": "x"}) + "\n" for s in ("To be", "And so", "O")))
    outs = {}
    for beams in ("1", "4"):
        r = call_cli(
            capsys,
            "eval",
            "seq2seq",
            "--model",
            str(d),
            "--data",
            str(data),
            "--num-beams",
            beams,
            "--max-new-tokens",
            "8",
            "--out",
            str(tmp_path / f"e{beams}"),
            "--json",
        )
        assert r.returncode == 0, r.stderr
        outs[beams] = [
            json.loads(line)["prediction"]
            for line in (tmp_path / f"e{beams}" / "predictions.jsonl").read_text().splitlines()
        ]
    assert outs["4"][0] == api(model, tk, "To be", max_new_tokens=8, num_beams=4, stop=["\n"]).strip()
    assert outs["1"] != outs["4"]
