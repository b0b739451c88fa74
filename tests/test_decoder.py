import pytest
import torch

from conftest import tiny_config
from lmforge.config import PRESETS, model_config
from lmforge.models import DecoderLM


def make(style, **kw):
    torch.manual_seed(0)
    return DecoderLM(tiny_config(style, **kw)).eval()


def test_param_count_matches_config(style):
    m = make(style)
    assert m.num_params() == m.config.num_params()


@pytest.mark.parametrize("preset", ["gpt2-124m", "llama-small", "smollm2-135m", "quickstart"])
def test_presets_count_known_sizes(preset):
    cfg = model_config(preset)
    with torch.device("meta"):
        m = DecoderLM(cfg)
    assert m.num_params() == cfg.num_params()
    known = {"gpt2-124m": 124_439_808, "smollm2-135m": 134_515_008}
    if preset in known:
        assert cfg.num_params() == known[preset]
    assert cfg.flops_per_token(training=True) == 3 * cfg.flops_per_token(training=False)


def test_gpt2_flops_formula():
    c = model_config("gpt2-124m")
    # 2 FLOPs per matmul weight per token (blocks + lm head) + attention 4 * L * T * d
    n = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 50257 * 768
    expected = 2 * n + 4 * 12 * 1024 * 768
    assert abs(c.flops_per_token(training=False) - expected) / expected < 0.01


def test_causality(style):
    m = make(style)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = m(x).logits, m(y).logits
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_matches_full_forward(style):
    m = make(style)
    x = torch.randint(0, 97, (3, 24))
    full = m(x).logits
    cache = m.new_cache(3, 24)
    steps = [m(x[:, :10], cache=cache).logits]  # prefill 10, then one token at a time
    for t in range(10, 24):
        steps.append(m(x[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def test_left_padding_with_cache_matches_unpadded(style):
    m = make(style)
    short, long_ = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 9))
    ids = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long_])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    cache = m.new_cache(2, 12)
    out = m(ids, attention_mask=mask[:, :9], cache=cache).logits
    nxt = torch.randint(0, 97, (2, 1))
    step = m(nxt, attention_mask=mask[:, :10], cache=cache).logits
    alone = m(torch.cat([short, nxt[:1]], 1)).logits
    torch.testing.assert_close(out[0, 3:], alone[0, :6], rtol=0, atol=1e-5)
    torch.testing.assert_close(step[0, 0], alone[0, 6], rtol=0, atol=1e-5)
    alone_long = m(torch.cat([long_, nxt[1:]], 1)).logits
    torch.testing.assert_close(step[1, 0], alone_long[0, 9], rtol=0, atol=1e-5)


def test_tied_embeddings_share_storage():
    m = make("gpt2")
    assert m.lm_head.weight is m.tok_emb.weight
    m2 = make("llama")
    assert m2.lm_head.weight is not m2.tok_emb.weight


def test_scaled_residual_init():
    m = DecoderLM(model_config("bench-gpt2", n_layer=8))
    std = m.blocks[0].attn.o_proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert abs(m.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002


def test_presets_are_valid():
    for name in PRESETS:
        model_config(name).validate()


def test_fused_head_loss_equals_plain_loss_and_gradients(style):
    """loss_only=True (nn.loss.linear_cross_entropy: head, loss and gradients in chunks) gives the plain
    head + cross-entropy's loss and parameter gradients, with ignored positions, on a tied (gpt2) and an untied
    (llama) head."""
    from lmforge.nn.loss import linear_cross_entropy

    torch.manual_seed(0)
    model = DecoderLM(tiny_config(style)).train()
    model.drop.p = 0.0
    for b in model.blocks:
        b.drop.p = b.attn.dropout = 0.0
    x = torch.randint(0, model.config.vocab_size, (3, 17))
    y = torch.randint(0, model.config.vocab_size, (3, 17))
    y[0, :5] = -100
    grads = []
    for fused in (False, True):
        model.zero_grad()
        out = model(x, labels=y, loss_only=fused)
        assert (out.logits is None) == fused
        out.loss.backward()
        grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-4, atol=1e-6, msg=n)
    h, w = torch.randn(10, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    t = torch.randint(0, 30, (10,))
    ref = torch.nn.functional.cross_entropy(h @ w.T, t)
    torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=3), ref)
    with torch.no_grad():  # no gradients wanted: the loss only
        torch.testing.assert_close(linear_cross_entropy(h, w, t, chunk=4), ref)
