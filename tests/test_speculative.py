"""Speculative decoding: prompt lookup and a draft model give plain decoding's tokens exactly, greedy and seeded
sampling alike (so sampled replies follow the model's distribution), and drafting rests while it keeps
missing."""

import pytest
import torch

from conftest import tiny_config
from lmforge.errors import LmforgeError
from lmforge.generate import SamplingParams, generate_ids
from lmforge.generate.speculative import Drafter, ModelDrafter, NgramDrafter, check_draft_model
from lmforge.models.decoder import DecoderLM


def _model(seed: int = 0, **kw) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(tiny_config("llama", **kw)).eval()


def _ids(model, prompt, params, draft=None) -> list[int]:
    return [int(t) for t in generate_ids(model, [prompt], params, draft=draft)]


REPEATING = [5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9, 10, 11, 5, 6, 7]


@pytest.mark.parametrize("drafter", ["ngram", "self", "other"])
def test_greedy_tokens_identical_to_plain_decoding(drafter):
    model = _model()
    params = SamplingParams(40, temperature=0)
    draft = {
        "ngram": lambda: NgramDrafter(k=4),
        "self": lambda: ModelDrafter(model, k=3),
        "other": lambda: ModelDrafter(_model(seed=1), k=3),
    }[drafter]()
    plain = _ids(model, REPEATING, params)
    assert _ids(model, REPEATING, params, draft) == plain
    s = draft.stats
    assert s["passes"] > 0 and s["drafted"] > 0
    if drafter == "self":  # the model drafting for itself: every draft is kept, so fewer passes than tokens
        assert s["accepted"] == s["drafted"] and s["passes"] + s["plain_steps"] < len(plain) - 1
    # again with an end token and a length limit reached inside a draft
    again = type(draft)(model, k=3) if drafter == "self" else NgramDrafter(k=4)
    eos = plain[7]
    short = [
        int(t)
        for t in generate_ids(model, [REPEATING], SamplingParams(12, temperature=0), eos_token_id=eos, draft=again)
    ]
    want = plain[:12]
    want = want[: want.index(eos) + 1] if eos in want else want
    assert short == want


def test_greedy_with_repetition_penalty_identical():
    model = _model()
    params = SamplingParams(30, temperature=0, repetition_penalty=1.3)
    assert _ids(model, REPEATING, params, NgramDrafter()) == _ids(model, REPEATING, params)


@pytest.mark.parametrize("drafter", ["ngram", "other"])
def test_seeded_sampling_gives_plain_decodings_tokens(drafter):
    """A seeded sampled reply is the same with and without a drafter: each position's token is drawn as plain
    decoding draws it, from logits that are bitwise plain decoding's (filters and repetition penalty on)."""
    model = _model()
    for seed in range(6):
        params = SamplingParams(30, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.1, seed=seed)
        draft = NgramDrafter(k=4, patience=100) if drafter == "ngram" else ModelDrafter(_model(seed=1), k=3)
        plain = _ids(model, REPEATING, params)
        assert _ids(model, REPEATING, params, draft) == plain, seed
        assert draft.stats["passes"] > 0


@pytest.mark.slow  # (suite time: about 30-60 s on 2 cores)
def test_sampling_end_to_end_follows_the_models_distribution():
    """Sampled replies (top-k 2, three tokens: eight possible replies) through prompt lookup, which drafts at
    every step here, occur as often as the model gives them: frequencies over 3,000 seeds against the exact
    probabilities, enumerated from the model's own filtered distributions (plain sampling checked the same way)."""
    from lmforge.generate.speculative import model_probs

    model = _model(vocab_size=13)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    params = SamplingParams(3, temperature=1.0, top_k=2)
    exact: dict[tuple, float] = {}
    with torch.inference_mode():

        def dist(prefix):
            return model_probs(model(torch.tensor([prompt + list(prefix)])).logits[0, -1:], params)[0]

        for a in dist(()).nonzero().flatten().tolist():
            for b in dist((a,)).nonzero().flatten().tolist():
                for c in dist((a, b)).nonzero().flatten().tolist():
                    exact[(a, b, c)] = float(dist(())[a] * dist((a,))[b] * dist((a, b))[c])
    assert len(exact) == 8 and abs(sum(exact.values()) - 1) < 1e-5
    n = 3000
    for name, make in (("plain", lambda: None), ("ngram", lambda: NgramDrafter(k=2, patience=100))):
        counts: dict[tuple, int] = {}
        for seed in range(n):
            key = tuple(_ids(model, prompt, SamplingParams(3, temperature=1.0, top_k=2, seed=seed), make()))
            counts[key] = counts.get(key, 0) + 1
        assert set(counts) <= set(exact), name
        tv = 0.5 * sum(abs(counts.get(x, 0) / n - p) for x, p in exact.items())
        assert tv < 0.06, (name, tv)  # (about 0.02 expected from sampling noise alone)


class _Wrong(Drafter):
    """Always proposes `token`, one the model never picks in the reply."""

    def __init__(self, token: int, **kw) -> None:
        super().__init__(**kw)
        self.token = token

    def propose(self, tokens, k, params, generator):
        return [self.token] * k, None


def test_drafting_rests_while_it_keeps_missing():
    model = _model(max_seq_len=128)
    params = SamplingParams(64, temperature=0)
    plain = _ids(model, REPEATING, params)
    never = min(set(range(model.config.vocab_size)) - set(plain))
    draft = _Wrong(never, k=4, patience=2)
    assert _ids(model, REPEATING, params, draft) == plain
    s = draft.stats
    assert s["accepted"] == 0 and s["passes"] <= 14, s  # pairs of misses, then rests of 1, 2, 4, 8, 16, 32 steps
    assert s["plain_steps"] > 40


def test_bad_uses_are_clear_errors():
    model = _model()
    with pytest.raises(LmforgeError, match="one prompt at a time"):
        list(generate_ids(model, [[1, 2], [3, 4]], SamplingParams(4), draft=NgramDrafter()))
    with pytest.raises(LmforgeError, match="same tokenizer"):
        check_draft_model(model, _model(vocab_size=50))
    with pytest.raises(LmforgeError, match="draft length"):
        NgramDrafter(k=0)


def test_cli_speculative_gives_plain_greedy_text(tmp_path, capsys):
    """`generate --speculative ngram|MODEL` (chat passes it on the same way) on a saved model: the same greedy
    text as without; a draft model that does not exist or a second prompt are one-line user errors."""
    from conftest import call_cli
    from lmforge.data.vocab import train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("one two three four five six seven eight nine ten. " * 40, encoding="utf-8")
    tok = train_tokenizer([str(corpus)], vocab_size=300)
    torch.manual_seed(0)
    DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size, max_seq_len=128)).save_pretrained(
        tmp_path / "m", tokenizer=tok
    )
    base = [
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--prompt",
        "one two three four five one two three",
        "--temperature",
        "0",
        "--max-new-tokens",
        "24",
        "--no-stream",
    ]
    plain = call_cli(capsys, *base)
    assert plain.returncode == 0, plain.stderr
    for spec in ("ngram", str(tmp_path / "m")):
        r = call_cli(capsys, *base, "--speculative", spec)
        assert r.returncode == 0 and r.stdout == plain.stdout, (spec, r.stderr)
    for extra, needle in (
        (["--speculative", str(tmp_path / "nope")], "does not exist"),
        (["--speculative", "ngram", "--prompt", "again"], "one prompt at a time"),
    ):
        r = call_cli(capsys, *base, *extra)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr


def test_engine_speculates_for_a_lone_sequence_with_plain_tokens():
    """The serving engine with prompt lookup: a lone greedy request gets plain decoding's tokens in fewer
    steps; requests running together (no drafting then) and one that asks for logprobs get theirs too; stop at
    an end token inside a kept draft; a sampled request's seed gives the same reply twice."""
    from conftest import IdsTokenizer, in_threads
    from lmforge.generate.engine import Engine, Request

    model = _model(max_seq_len=128)
    params = SamplingParams(40, temperature=0)
    plain = _ids(model, REPEATING, params)
    engine = Engine(model, IdsTokenizer(), max_batch=4, draft=NgramDrafter()).start()
    try:
        r = Request(REPEATING, params)
        list(engine.stream(r))
        assert r.completion_ids == plain
        assert engine.stats.spec_passes > 0 and engine.stats.accepted > 0
        assert engine.stats.steps < len(plain) - 1
        eos = plain[9]
        r = Request(REPEATING, params, end_ids=[eos])
        list(engine.stream(r))
        assert r.completion_ids == plain[: plain.index(eos) + 1]
        r = Request(REPEATING, params, logprobs=0)
        passes = engine.stats.spec_passes
        list(engine.stream(r))
        assert r.completion_ids == plain and engine.stats.spec_passes == passes
        prompts = [REPEATING, REPEATING[3:], [7, 8, 9, 7, 8, 9, 7]]
        want = [_ids(model, p, params) for p in prompts]
        got: dict[int, list[int]] = {}

        def run(i):
            req = Request(prompts[i], params)
            list(engine.stream(req))
            got[i] = req.completion_ids

        in_threads(run, 3)
        assert [got[i] for i in range(3)] == want
        sampled = [Request(REPEATING, SamplingParams(30, temperature=0.9, top_k=20, seed=5)) for _ in range(2)]
        for req in sampled:
            list(engine.stream(req))
        assert sampled[0].completion_ids == sampled[1].completion_ids and len(sampled[0].completion_ids) == 30
    finally:
        engine.close()
