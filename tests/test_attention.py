import pytest
import torch

from lmforge.nn.attention import attention_reference, causal_mask, padded_causal_mask, sdpa


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_sdpa_equals_formula_without_mask():
    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 7, 8), rand(2, 3, 7, 8)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    torch.testing.assert_close(attention_reference(q, k, v), expected)
    torch.testing.assert_close(sdpa(q, k, v, causal=False), expected)


def test_sdpa_causal_equals_formula_with_additive_mask():
    q, k, v = rand(2, 3, 6, 8), rand(2, 3, 6, 8), rand(2, 3, 6, 8)
    additive = torch.full((6, 6), float("-inf"), dtype=torch.float64).triu(1)
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + additive, -1) @ v
    torch.testing.assert_close(sdpa(q, k, v, causal=True), expected)
    torch.testing.assert_close(attention_reference(q, k, v, causal_mask(6, 6)), expected)


def test_causal_mask_with_cache_offset():
    # 2 new queries after 3 cached keys: query 0 sees keys 0..3, query 1 sees 0..4
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]
    q, k, v = rand(1, 2, 2, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 4)
    torch.testing.assert_close(sdpa(q, k, v, causal=True), attention_reference(q, k, v, m))


def test_padding_mask_hides_pad_keys():
    q, k, v = rand(2, 2, 4, 8), rand(2, 2, 4, 8), rand(2, 2, 4, 8)
    key_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    mask = padded_causal_mask(key_mask, 4)
    out = sdpa(q, k, v, mask)
    additive = torch.zeros(2, 1, 4, 4, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + additive, -1) @ v
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(out).all()  # pad queries see themselves: no empty softmax rows
    # real rows of the padded sequence equal attention over the unpadded sequence
    alone = sdpa(q[:1, :, 2:], k[:1, :, 2:], v[:1, :, 2:], causal=True)
    torch.testing.assert_close(out[:1, :, 2:], alone)
    # changing a pad key's value changes nothing for real queries
    v2 = v.clone()
    v2[0, :, 0] = 1e6
    torch.testing.assert_close(sdpa(q, k, v2, mask)[0, :, 2:], out[0, :, 2:])


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_query_equals_multi_head_with_repeated_kv(causal):
    q = rand(2, 6, 5, 8)
    k, v = rand(2, 2, 5, 8), rand(2, 2, 5, 8)
    gqa = sdpa(q, k, v, causal=causal)
    mha = sdpa(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), causal=causal)
    torch.testing.assert_close(gqa, mha)
    mask = causal_mask(5, 5) if causal else None
    torch.testing.assert_close(
        gqa, attention_reference(q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), mask)
    )


def test_compiled_one_query_attention_equals_the_formula():
    """A compiled decoding step computes single-query attention as sums over the cache (nn.attention._one_query),
    grouped-query heads through a view: it equals the formula with repeated K/V heads, under a key mask."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 8), torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    mask = torch.rand(2, 1, 1, 9) > 0.3
    mask[..., -1] = True  # every row sees at least its own key
    expected = attention_reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), mask)
    compiled = torch.compile(lambda q, k, v, m: sdpa(q, k, v, m), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), expected, rtol=1e-5, atol=1e-5)
