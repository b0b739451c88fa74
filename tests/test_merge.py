"""Model merging (lmforge.compress.merge): each method's arithmetic, greedy soups, adapters folded into their
base, and the CLI's refusals."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import call_cli, tiny_config
from lmforge.compress.merge import merge, merge_states
from lmforge.errors import LmforgeError
from lmforge.interop import load_pretrained
from lmforge.interop.peft import save_adapter
from lmforge.models.decoder import DecoderLM
from lmforge.nn.lora import apply_lora
from lmforge.tokenizer import Tokenizer

TEXT = "the cat sat on the mat and the dog sat on the log while the bird sang in the tree " * 8


def test_each_method_computes_what_its_paper_says():
    base = {"w": torch.zeros(5)}
    a = {"w": torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0])}
    b = {"w": torch.tensor([1.0, 2.0, -0.5, 0.0, -4.0])}
    torch.testing.assert_close(merge_states([a, b])["w"], torch.tensor([2.0, 0.5, 0.0, 0.0, -1.0]))
    torch.testing.assert_close(merge_states([a, b], weights=[3, 1])["w"], torch.tensor([2.5, -0.25, 0.25, 0, 0.5]))
    torch.testing.assert_close(
        merge_states([a, b], "task-arithmetic", base, scale=0.5)["w"], torch.tensor([2.0, 0.5, 0.0, 0.0, -1.0])
    )
    # ties, density 0.4 (2 of 5 kept): a keeps 3 and 2, b keeps 2 and -4; signs elected by the sums: +, +, 0, 0, -;
    # the agreeing entries' mean: 3, 2 (b's alone), 0, 0, -4 (b's alone: a's +2 disagrees)
    torch.testing.assert_close(
        merge_states([a, b], "ties", base, density=0.4)["w"], torch.tensor([3.0, 2.0, 0.0, 0.0, -4.0])
    )
    # a parameter the base lacks (a classifier's head) is averaged in every method
    head = merge_states([{"h": torch.ones(2)}, {"h": 3 * torch.ones(2)}], "ties", {}, density=0.5)["h"]
    torch.testing.assert_close(head, torch.full((2,), 2.0))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny decoder (the base) and three children: two trained a few steps on the text, one broken."""
    root = tmp_path_factory.mktemp("merge")
    tok = Tokenizer.train_bpe([TEXT], vocab_size=280)
    torch.manual_seed(0)
    base = DecoderLM(tiny_config("llama", vocab_size=tok.vocab_size))
    base.save_pretrained(root / "base", tokenizer=tok)
    ids = tok.encode(TEXT)
    for name, part in (("a", ids[:64]), ("b", ids[64:128])):  # (each its own data)
        m, _ = load_pretrained(root / "base")
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        part = torch.tensor([part])
        for _ in range(6):
            loss = m(input_ids=part[:, :-1], labels=part[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        m.save_pretrained(root / name, tokenizer=tok)
    m, _ = load_pretrained(root / "base")
    torch.manual_seed(5)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))  # noise far larger than the weights: a parent that ruins any soup
    m.save_pretrained(root / "broken", tokenizer=tok)
    (root / "text.txt").write_text(TEXT)
    return root


def _params(path):
    return {k: v for k, v in load_pretrained(path)[0].state_dict().items()}


def test_uniform_merge_of_a_model_with_itself_is_the_model_and_reports_before_after(family, tmp_path):
    r = merge(
        [str(family / "a"), str(family / "a")], tmp_path / "m", eval_data=[str(family / "text.txt")], say=lambda s: None
    )
    merged, a = _params(tmp_path / "m"), _params(family / "a")
    assert all(torch.equal(merged[k], a[k]) for k in a)
    saved = json.loads((tmp_path / "m" / "merge.json").read_text())
    assert saved["method"] == "uniform" and saved["merged"]["quality"] == pytest.approx(r["parents"][0]["quality"])


def test_ties_and_task_arithmetic_from_the_base(family, tmp_path):
    parents = [str(family / "a"), str(family / "b")]
    merge(parents, tmp_path / "ta", "task-arithmetic", base=str(family / "base"), scale=0.5, say=lambda s: None)
    merge(parents, tmp_path / "u", say=lambda s: None)
    ta, u = _params(tmp_path / "ta"), _params(tmp_path / "u")
    assert all(torch.allclose(ta[k], u[k], atol=1e-6) for k in u)  # scale 1/N of the summed vectors: the mean
    merge(parents, tmp_path / "ties", "ties", base=str(family / "base"), density=0.3, say=lambda s: None)
    base, ties, a = _params(family / "base"), _params(tmp_path / "ties"), _params(family / "a")
    k = "blocks.0.mlp.up.weight"
    moved = (ties[k] != base[k]).float().mean().item()
    assert 0.29 <= moved <= 0.61  # each trimmed to 30%: their union, where the elected sign has support
    assert not torch.equal(ties[k], a[k])


def test_greedy_soup_leaves_out_a_parent_that_makes_it_worse(family, tmp_path):
    text = str(family / "text.txt")
    r = merge(
        [str(family / "broken"), str(family / "a"), str(family / "b")],
        tmp_path / "g",
        "greedy",
        val_data=text,
        eval_data=[text],
        say=lambda s: None,
    )
    assert str(family / "broken") not in r["kept"] and str(family / "a") in r["kept"]
    best_parent = min(p["quality"] for p in r["parents"])
    assert r["merged"]["quality"] <= best_parent + 1e-6  # perplexity: the soup is no worse than its best parent


def test_adapters_fold_into_their_base_before_merging(family, tmp_path):
    """Two LoRA adapters of the base: merging them is merging the models they make with it."""
    for name, seed in (("la", 3), ("lb", 4)):
        m, tok = load_pretrained(family / "base")
        apply_lora(m, "attn", r=4, alpha=8, dropout=0.0)
        torch.manual_seed(seed)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        save_adapter(m, tmp_path / name, base_model=str(family / "base"), tokenizer=tok)
        from lmforge.nn.lora import merge_and_unload

        merge_and_unload(m).save_pretrained(tmp_path / f"{name}-full", tokenizer=tok)
    merge([str(tmp_path / "la"), str(tmp_path / "lb")], tmp_path / "from-adapters", say=lambda s: None)
    merge([str(tmp_path / "la-full"), str(tmp_path / "lb-full")], tmp_path / "from-models", say=lambda s: None)
    x, y = _params(tmp_path / "from-adapters"), _params(tmp_path / "from-models")
    assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in y)


def test_merge_refuses_what_cannot_merge(family, tmp_path, capsys):
    other = DecoderLM(tiny_config("gpt2", vocab_size=280))
    other.save_pretrained(tmp_path / "other", tokenizer=load_pretrained(family / "a")[1])
    with pytest.raises(LmforgeError, match="not the same architecture"):
        merge([str(family / "a"), str(tmp_path / "other")], tmp_path / "x", say=lambda s: None)
    a = str(family / "a")
    for args, needle in (
        ([a, "--out", str(tmp_path / "y")], "merging needs two models or more"),
        ([a, a, "--out", str(tmp_path / "y"), "--method", "ties"], "give --base"),
        ([a, a, "--out", str(tmp_path / "y"), "--method", "greedy"], "give --val-data"),
        ([a, a, "--out", str(tmp_path / "y"), "--scale", "2"], "--scale and --density apply to task-arithmetic"),
        ([a, a, "--out", str(tmp_path / "y"), "--weights", "1,x"], "--weights takes numbers"),
        ([a, a, "--out", str(tmp_path / "y"), "--weights", "1,2,3"], "one weight per model (2)"),
    ):
        r = call_cli(capsys, "merge", *args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "y").exists()
