import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from lmforge.data.corpus import Document
from lmforge.data.shards import TokenShard, build_shards
from lmforge.data.spans import (
    SpanCorruptionBatcher,
    corrupt,
    input_target_lengths,
    noise_mask,
    noise_masks,
    raw_length_for,
    span_counts,
)
from lmforge.errors import ConfigError
from lmforge.tokenizer import Tokenizer

SENTINELS = [-1 - i for i in range(200)]  # never equal to a token id below
EOS = -1000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def runs(mask: torch.Tensor) -> int:
    """Number of noise spans (maximal runs of True)."""
    m = mask.long()
    return int(m[0]) + int(((m[1:] - m[:-1]) == 1).sum())


def fill(inputs: list[int], target: list[int]) -> list[int]:
    """Undo span corruption: put each sentinel's span from the target back into the input."""
    assert inputs[-1] == EOS and target[-1] == EOS
    spans: dict[int, list[int]] = {}
    for t in target[:-1]:
        if t in SENTINELS:
            spans[t] = current = []
        else:
            current.append(t)
    assert list(spans) == SENTINELS[: len(spans)]  # sentinels in order, starting with <extra_id_0>
    out = []
    for t in inputs[:-1]:
        out += spans.pop(t) if t in SENTINELS else [t]
    assert not spans
    return out


@pytest.mark.parametrize("length", [2, 3, 10, 37, 100, 568])
def test_noise_mask_counts_and_shape(length):
    num_noise, num_spans = span_counts(length)
    assert num_noise == min(max(round(length * 0.15), 1), length - 1)
    for seed in range(20):
        m = noise_mask(length, 0.15, 3.0, gen(seed))
        assert m.shape == (length,) and m.dtype == torch.bool
        assert int(m.sum()) == num_noise
        assert runs(m) == num_spans
        assert not m[0] and m[-1]  # starts with kept text, ends with a dropped span
    if length == 568:  # T5's numbers
        assert (num_noise, num_spans) == (85, 28)


def test_noise_mask_other_settings_and_randomness():
    m = noise_mask(200, 0.3, 5.0, gen())
    assert int(m.sum()) == 60 and runs(m) == 12
    assert torch.equal(noise_mask(100, gen=gen(3)), noise_mask(100, gen=gen(3)))
    assert len({tuple(noise_mask(100, gen=gen(s)).tolist()) for s in range(10)}) == 10
    # span lengths vary: not every mask is the same periodic pattern
    lengths = torch.cat(
        [torch.diff(torch.nonzero(torch.diff(noise_mask(300, gen=gen(s)).long())).flatten()) for s in range(5)]
    )
    assert lengths.unique().numel() > 3
    # a batch of masks, drawn in one go, is as deterministic, and every row is a valid mask
    ms = noise_masks(8, 50, 0.15, 3.0, gen(1))
    assert torch.equal(ms, noise_masks(8, 50, 0.15, 3.0, gen(1)))
    assert (ms.sum(1) == span_counts(50)[0]).all() and not ms[:, 0].any()


def test_corrupt_format_and_round_trip():
    tokens = torch.arange(100, 112)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[2, 3, 7, 10, 11]] = True
    inputs, target = corrupt(tokens, mask, SENTINELS, EOS)
    assert inputs.tolist() == [100, 101, -1, 104, 105, 106, -2, 108, 109, -3, EOS]
    assert target.tolist() == [-1, 102, 103, -2, 107, -3, 110, 111, EOS]
    for seed in range(10):
        t = torch.randint(0, 1000, (77,), generator=gen(seed))
        m = noise_mask(77, gen=gen(seed))
        i, o = corrupt(t, m, SENTINELS, EOS)
        assert (len(i), len(o)) == input_target_lengths(77)
        assert fill(i.tolist(), o.tolist()) == t.tolist()
    with pytest.raises(ValueError, match="sentinel"):
        corrupt(tokens, mask, SENTINELS[:2], EOS)


def test_corrupt_batch_matches_rows():
    t = torch.randint(0, 1000, (6, 90), generator=gen())
    ms = noise_masks(6, 90, 0.15, 3.0, gen(2))
    inputs, target = corrupt(t, ms, SENTINELS, EOS)
    assert (inputs.shape[1], target.shape[1]) == input_target_lengths(90)
    for r in range(6):
        i, o = corrupt(t[r], ms[r], SENTINELS, EOS)
        assert torch.equal(inputs[r], i) and torch.equal(target[r], o)
    uneven = ms.clone()
    uneven[0] = False
    uneven[0, 5] = True
    with pytest.raises(ValueError, match="every row"):
        corrupt(t, uneven, SENTINELS, EOS)


def test_raw_length_for_inverts_input_length():
    assert raw_length_for(512) == 568 and input_target_lengths(568) == (512, 114)  # T5's 512 -> 568, 114
    for settings in [(0.15, 3.0), (0.3, 5.0), (0.1, 2.0)]:
        for n in range(3, 700):
            raw = raw_length_for(n, *settings)
            assert input_target_lengths(raw, *settings)[0] == n
            assert all(input_target_lengths(r, *settings)[0] > n for r in range(raw + 1, raw + 10))


@pytest.fixture(scope="module")
def t5_tok():
    texts = [
        "En el principio creó Dios los cielos y la tierra.",
        "Y dijo Dios: Sea la luz; y fue la luz.",
        "To be, or not to be, that is the question.",
        "Whether 'tis nobler in the mind to suffer",
    ] * 30
    return Tokenizer.train_unigram(texts, vocab_size=150, extra_ids=40)


@pytest.fixture(scope="module")
def shard_dir(t5_tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("spans")
    docs = [
        Document(f"doc{i}.txt", "Y dijo Dios: Sea la luz; y fue la luz. To be, or not to be. " * 20) for i in range(4)
    ]
    build_shards(docs[:3], docs[3:], t5_tok, d)
    return d


def test_batcher_on_a_token_shard(t5_tok, shard_dir):
    shard = TokenShard.open(shard_dir, "train")
    b = SpanCorruptionBatcher(t5_tok, input_len=64)
    assert b.input_len == 64 and input_target_lengths(b.raw_len) == (b.input_len, b.target_len)
    shard.check_fits(b.raw_len, "train")
    g = gen(5)
    starts = shard.random_starts(4, b.raw_len, g)
    state = g.get_state()
    out = b(shard, starts, g)
    assert set(out) == {"input_ids", "labels"}
    assert out["input_ids"].shape == (4, 64) and out["labels"].shape == (4, b.target_len)
    assert out["input_ids"].dtype == torch.long and out["labels"].dtype == torch.long
    assert (out["input_ids"][:, -1] == t5_tok.eos_id).all() and (out["labels"][:, -1] == t5_tok.eos_id).all()
    assert (out["labels"][:, 0] == t5_tok.sentinel_id(0)).all()
    g.set_state(state)
    again = b(shard, starts, g)
    assert all(torch.equal(v, again[k]) for k, v in out.items())  # same draws, same batch
    # each row decodes back to its raw window
    raw = shard.windows(starts, b.raw_len)[0]
    sent = {s: -1 - i for i, s in enumerate(t5_tok.sentinel_ids(b.num_spans))}
    for r in range(4):
        i = [sent.get(t, t) for t in out["input_ids"][r].tolist()[:-1]] + [EOS]
        o = [sent.get(t, t) for t in out["labels"][r].tolist()[:-1]] + [EOS]
        assert fill(i, o) == raw[r].tolist()


def test_batcher_errors(t5_tok):
    bpe = Tokenizer.train_bpe(["some text here"] * 10, vocab_size=270)
    with pytest.raises(ConfigError, match="needs a tokenizer with <extra_id_N> sentinel tokens"):
        SpanCorruptionBatcher(bpe, input_len=64)
    assert SpanCorruptionBatcher(t5_tok, input_len=512).num_spans == 28  # fits in 40 sentinels
    with pytest.raises(ConfigError, match="makes 57 spans but the tokenizer has 40 <extra_id_N> sentinels"):
        SpanCorruptionBatcher(t5_tok, input_len=1024)
    with pytest.raises(ConfigError, match="noise_density"):
        SpanCorruptionBatcher(t5_tok, input_len=64, noise_density=1.5)
    with pytest.raises(ConfigError, match="mean_span"):
        SpanCorruptionBatcher(t5_tok, input_len=64, mean_span=0.5)
    # sentinels but no end-of-sequence token
    vocab = {"[UNK]": 0, "hello": 1, **{f"<extra_id_{i}>": 2 + i for i in range(5)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConfigError, match="end-of-sequence"):
        SpanCorruptionBatcher(Tokenizer(hf), input_len=16)
