"""Batch-invariant inference: a row's numbers do not depend on the other rows computed with it.

Decoding puts different numbers of rows through the same products: one row a step alone, eight rows when eight
requests share a step, k + 1 rows when a speculative pass verifies k drafts, hundreds when a prompt is read (in
one pass, or in chunks beside other streams). CPU matrix libraries choose their kernel by shape, and not every
kernel sums a row's products in the same order: measured on an AMD EPYC (torch 2.13), MKL's fp32 product gives
a row one result alone, another among 2-3 rows and a third among 4 or more; oneDNN's prepacked fp32 product one
alone and another among 2 or more; the bf16, int8 and int4 kernels the same at every count. Float addition is
not associative, so a row's logits move in their last bits with its neighbours, and where two tokens are nearly
tied greedy decoding picks another one: a served reply then depends on who else is being served, speculative
decoding is no longer lossless, and a seed does not reproduce a run under load.

This module makes every inference product and attention independent of the rows around it, by measurement:

- A product's *row plan* is found the first time a layer of its kind and shape runs (`probe_rows`): random rows
  are put through it in calls of many sizes (1 to a few hundred rows) and at shifted places, and a plan is kept
  when every row comes out bitwise the same however it was called. The plans, cheapest first: run as called
  (the kernel is invariant already: bf16, int8 and int4 here); pad a call to at least m rows with zero rows
  (the kernel sums one way from m rows on: m = 2 for oneDNN fp32, 4 for MKL fp32 here); run in tiles of exactly
  t rows. A tile of one row is the fallback that holds by construction (every row is then computed alone).
- Attention (`attention`) has every product at a fixed size whatever the call: a row's keys start at position 0
  of its cache (callers keep no left padding) and are taken up to a whole number of blocks of KEY_BLOCK (64)
  positions, the ones past its own hidden (probability exactly 0; a cache allocates whole blocks, so they are
  read in place); the scores in one product, one softmax, the probabilities times the values one block at a
  time, and the blocks' results added in order by a prefix sum (blocks past a row's keys add exact zeros). The
  row plan of its query rows is probed the same way (a query alone, among more queries, among rows with longer
  keys). Smaller blocks read fewer hidden keys at short contexts; 64 was the fastest of 64/128/256 here.

Padding costs time only where a kernel needs it and a call has fewer rows than that (a lone decoding row);
tokens/s before and after, per weight mode, are in benchmarks/batch_invariance.py. Training (gradients on)
never goes through here. `set_enabled(False)` turns it off (the benchmark's "off").
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_enabled = True
_lock = threading.Lock()


def set_enabled(on: bool) -> None:
    """Batch-invariant products and attention on (the default) or off (each kernel as the library picks it)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def active(x: torch.Tensor) -> bool:
    """Whether a product or attention on `x` goes through a plan here: inference (no gradient), not compiling."""
    return _enabled and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------------------------
# row plans for products


@dataclass(frozen=True)
class RowPlan:
    pad: int = 1  # calls with fewer rows are padded with zero rows up to this many
    tile: int = 0  # > 0: rows go through in calls of exactly this many (the last one padded)

    def run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn over the rows of x [M, K] under this plan; [M, N]."""
        M = x.size(0)
        if self.tile:
            t = self.tile
            n = -(-M // t) * t
            if n != M:
                x = torch.cat([x, x.new_zeros(n - M, x.size(1))])
            if n == t:
                return fn(x)[:M]
            return torch.cat([fn(x[s : s + t]) for s in range(0, n, t)])[:M]
        if M >= self.pad:
            return fn(x)
        return fn(torch.cat([x, x.new_zeros(self.pad - M, x.size(1))]))[:M]

    def __str__(self) -> str:
        return f"tiles of {self.tile}" if self.tile else ("as called" if self.pad == 1 else f"at least {self.pad} rows")


CANDIDATES = (
    RowPlan(),
    RowPlan(pad=2),
    RowPlan(pad=4),
    RowPlan(pad=8),
    RowPlan(pad=16),
    RowPlan(tile=16),
    RowPlan(tile=8),
    RowPlan(tile=4),
    RowPlan(tile=2),
)
FALLBACK = RowPlan(tile=1)  # every row alone: invariant by construction
SIZES = (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 24, 31, 32, 33, 48, 63, 64, 65, 96, 127, 128, 129, 255, 256, 257, 512, 513)
PROBE_FLOPS = 3e9  # a probe's budget: the call sizes it tries stop where their rows would cost more

_plans: dict[tuple, RowPlan] = {}
report: dict[str, str] = {}  # kind -> the plan chosen, for benchmarks and notes ("int4 576x1536 bfloat16": ...)


def _consistent(plan: RowPlan, fn, X: torch.Tensor, sizes: list[int]) -> bool:
    """Every row of X the same bitwise whether it goes through alone, or in a call of each size, at two places."""
    check = sorted(
        {
            r
            for r in (0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 100, 127, 128, 200, 256, 300, 511, 512)
            if r < X.size(0)
        }
    )
    alone = {r: plan.run(fn, X[r : r + 1])[0] for r in check}
    for size in sizes:
        for shift in (0, 1) if size + 1 <= X.size(0) else (0,):
            y = plan.run(fn, X[shift : shift + size])
            for r in check:
                if shift <= r < shift + size and not torch.equal(y[r - shift], alone[r]):
                    return False
    return True


def probe_rows(
    kind: str, fn: Callable[[torch.Tensor], torch.Tensor], k: int, n: int, dtype: torch.dtype, device: torch.device
) -> RowPlan:
    """The cheapest row plan under which fn ([M, k] -> [M, n]) gives every row the same numbers however it is
    called, measured on random rows (kept per kind, shape, dtype, device and thread count)."""
    key = (kind, k, n, dtype, device.type, torch.get_num_threads())
    plan = _plans.get(key)
    if plan is not None:
        return plan
    with torch.inference_mode():
        per_row = max(2.0 * k * n, 1.0)
        sizes = [s for s in SIZES if s == 1 or s * per_row * 3 <= PROBE_FLOPS]  # (a plan runs each size twice)
        g = torch.Generator().manual_seed(0)
        X = torch.randn(max(sizes) + 1, k, generator=g).to(device=device, dtype=dtype)
        plan = next((p for p in CANDIDATES if _consistent(p, fn, X, sizes)), FALLBACK)
    with _lock:
        _plans[key] = plan
        report[f"{kind} {k}x{n} {str(dtype).removeprefix('torch.')}"] = str(plan)
    return plan


def rows(kind: str, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int) -> torch.Tensor:
    """fn(x) for x [..., k] with the rows flattened, under the plan for this kind and shape (probed on first use):
    each row's result the same whatever else is in the call. Outside inference, fn(x) as it is."""
    if not _enabled or (x.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return fn(x)
    k = x.shape[-1]
    plan = _plans.get((kind, k, n, x.dtype, x.device.type, torch.get_num_threads())) or probe_rows(
        kind, fn, k, n, x.dtype, x.device
    )
    if not plan.tile and (plan.pad == 1 or x.numel() >= plan.pad * k):  # (every decoding step: keep it short)
        return fn(x)
    shape = x.shape
    return plan.run(fn, x.reshape(-1, k)).reshape(*shape[:-1], -1)


# --------------------------------------------------------------------------------------------------------------
# attention

KEY_BLOCK = 64  # keys per block of the probabilities-times-values product (see `attention`)
SCORES_MAX = 1 << 23  # score elements per call at most: longer prompts go through in groups of queries

_attention_plans: dict[tuple, RowPlan] = {}  # -> the row plan of attention's products (rows: queries x heads)


def _padded(M: int, plan: RowPlan) -> int:
    """How many rows a call of M rows has under the plan (zero rows added up to its count, or to whole tiles)."""
    step = plan.tile or max(M, plan.pad)
    return -(-M // step) * step


def _bmm(a: torch.Tensor, b: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """a [batch, M, K] @ b [batch, K, N], a's rows already padded under the plan (`_padded`): one call, or one
    per tile."""
    t = plan.tile
    if not t or a.size(1) == t:
        return torch.bmm(a, b)
    return torch.cat([torch.bmm(a[:, s : s + t], b) for s in range(0, a.size(1), t)], dim=1)


def _widened(x: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, Hkv, T, C] as [B * Hkv, n, C], n >= T: positions past T are read from x's own storage where it has
    them (a KV cache's unused positions: no copy), else filled with zeros. Either way they are hidden keys."""
    B, Hkv, T, C = x.shape
    s = x.stride()
    room = x.untyped_storage().nbytes() // x.element_size()
    if n == T or (
        s[3] == 1
        and s[2] == C
        and s[1] >= n * C
        and s[0] == Hkv * s[1]
        and x.storage_offset() + (B * Hkv - 1) * s[1] + n * C <= room
    ):
        if n != T:
            x = x.as_strided((B, Hkv, n, C), s)
        if x.stride(0) == Hkv * x.stride(1):
            return x.as_strided((B * Hkv, n, C), (x.stride(1), x.stride(2), x.stride(3)))
        return x.reshape(B * Hkv, n, C)
    return F.pad(x, (0, 0, 0, n - T)).reshape(B * Hkv, n, C)


_last_bias: tuple = ()  # (mask, key, bias): the decoding step's mask, made into a bias once for all its layers


def _bias(mask: torch.Tensor | None, H: int, Hkv: int, Tq: int, Tk: int, n: int, dtype, device) -> torch.Tensor | None:
    """The additive bias of a call's scores [B, Hkv, G, Tq, n]: the mask (bool: True = attend; float: added) and
    -inf on the hidden positions Tk..n; None where there is nothing to add. Kept for the next call with the same
    mask object (every layer of a decoding step passes the same one)."""
    global _last_bias
    if mask is None and n == Tk:
        return None
    key = (H, Hkv, Tq, Tk, n, dtype, device)
    last = _last_bias
    if last and last[0] is mask and last[1] == key:
        return last[2]
    G = H // Hkv
    if mask is None:
        bias = torch.zeros(1, 1, 1, 1, n, dtype=dtype, device=device)
    else:
        m = mask if mask.dim() == 4 else mask[None, None]  # [B or 1, H or 1, Tq or 1, Tk]
        heads = m.size(1) == H and H > 1
        m = m.reshape(m.size(0), Hkv if heads else 1, G if heads else 1, m.size(-2), m.size(-1))
        bias = torch.zeros(*m.shape[:-1], n, dtype=dtype, device=device)
        if m.dtype == torch.bool:
            bias[..., :Tk].masked_fill_(m.logical_not(), float("-inf"))
        else:
            bias[..., :Tk] = m
    bias[..., Tk:] = float("-inf")
    _last_bias = (mask, key, bias)
    return bias


def _attend(q, k, v, mask, scale, plan: RowPlan):
    """One group of queries, every product and the softmax at fixed sizes: the scores of the keys taken up to a
    multiple n of KEY_BLOCK (the positions past a row's keys hidden), one softmax over them, the probabilities
    times the values KEY_BLOCK keys at a time, those blocks' results added in order in fp32 (a block past a row's
    keys adds exact zeros). Query rows padded under the plan stay padded through both products (their scores,
    all zero, are never looked at) and are dropped at the end."""
    B, H, Tq, D = q.shape
    Hkv, Tk, Dv = k.size(1), k.size(2), v.size(-1)
    G, S = H // Hkv, KEY_BLOCK
    n = -(-Tk // S) * S
    nb, R = n // S, G * Tq
    Rp = _padded(R, plan)
    a = q.reshape(B * Hkv, R, D)
    if Rp != R:
        a = torch.cat([a, a.new_zeros(B * Hkv, Rp - R, D)], dim=1)
    s = _bmm(a, _widened(k, n).transpose(1, 2), plan)  # [B * Hkv, Rp, n]
    if s.dtype != torch.float32 and s.dtype != torch.float64:
        s = s.float()
    sv = (s[:, :R] if Rp != R else s).view(B, Hkv, G, Tq, n)
    bias = _bias(mask, H, Hkv, Tq, Tk, n, s.dtype, s.device)
    if bias is None:
        sv.mul_(scale)
    else:
        torch.add(bias, sv, alpha=scale, out=sv)  # scores * scale + bias, in place
    p = torch.softmax(s, dim=-1).to(v.dtype)  # [B * Hkv, Rp, n]
    vw = _widened(v, n)  # [B * Hkv, n, Dv]
    if nb == 1:
        out = _bmm(p, vw, plan)
    else:  # every block's product in one call: [B * Hkv * nb, Rp, S] @ [B * Hkv * nb, S, Dv]
        pb = p.view(B * Hkv, Rp, nb, S).transpose(1, 2).reshape(B * Hkv * nb, Rp, S)
        vb = vw.reshape(B * Hkv * nb, S, Dv)  # (a view where the keys are contiguous, else a copy)
        y = _bmm(pb, vb, plan).view(B * Hkv, nb, Rp, Dv)
        # the blocks added in order: a prefix sum is one sequential pass (the CPU kernel accumulates in double),
        # so blocks of zeros after a row's own add nothing, however many there are
        out = y.cumsum(1, dtype=torch.promote_types(v.dtype, torch.float32))[:, -1]
    if Rp != R:
        out = out[:, :R]
    return out.to(v.dtype).reshape(B, H, Tq, Dv)


def _run(q, k, v, mask, scale, plan: RowPlan) -> torch.Tensor:
    B, H, Tq, _ = q.shape
    step = max(1, SCORES_MAX // max(1, B * H * k.size(2)))  # queries a call, so that its scores stay small
    if Tq <= step:
        return _attend(q, k, v, mask, scale, plan)
    outs = []
    for s in range(0, Tq, step):
        m = mask
        if m is not None and m.size(-2) == Tq:
            m = m[..., s : s + step, :]
        outs.append(_attend(q[:, :, s : s + step], k, v, m, scale, plan))
    return torch.cat(outs, dim=2)


@functools.lru_cache(maxsize=64)
def _causal(Tq: int, Tk: int, device) -> torch.Tensor:
    """[Tq, Tk] bool: the queries are the last Tq of Tk positions (kept: the same object for every layer)."""
    q_pos = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    return torch.arange(Tk, device=device)[None, :] <= q_pos


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for q [B, H, Tq, D], k / v [B, Hkv, Tk, D] (grouped heads share theirs),
    each query row's result independent of the other rows and queries in the call and of hidden keys after its
    own (see the module notes). mask: bool (True = attend) or additive float, broadcastable to [B, H, Tq, Tk];
    None: causal (the queries are the last Tq of the Tk positions) or, with one query, every key."""
    scale = scale if scale is not None else 1 / math.sqrt(q.size(-1))
    plan = probe_attention(q.size(1), k.size(1), q.size(-1), v.size(-1), q.dtype, q.device)
    if mask is None and causal and q.size(2) > 1:
        mask = _causal(q.size(2), k.size(2), q.device)
    return _run(q, k, v, mask, scale, plan)


def _attention_consistent(plan: RowPlan, H: int, Hkv: int, D: int, Dv: int, dtype, device) -> bool:
    """A query's output the same alone, among more queries of its sequence (causal), and among rows whose keys
    reach further (their hidden tails longer), over key lengths that cross the kernels' usual block sizes."""
    g = torch.Generator().manual_seed(1)
    T = 600
    q = torch.randn(3, H, T, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(3, Hkv, T, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(3, Hkv, T, Dv, generator=g).to(device=device, dtype=dtype)
    scale = 1 / math.sqrt(D)

    def one(t: int, queries: int, keys: int, rows: int) -> torch.Tensor:
        """Query t of row 0 computed among `queries` queries ending at t, with `keys` keys, in `rows` rows."""
        lo = t + 1 - queries
        mask = _causal(queries, t + 1, device)
        mask = torch.cat([mask, mask.new_zeros(queries, keys - t - 1)], dim=1)[None, None].expand(rows, 1, -1, -1)
        return _run(q[:rows, :, lo : t + 1], k[:rows, :, :keys], v[:rows, :, :keys], mask, scale, plan)[0, :, -1]

    for t in (0, 5, 63, 64, 200, 255, 256, 300, 511, 512):
        ref = one(t, 1, t + 1, 1)
        for queries, keys, rows in (
            (1, min(T, t + 40), 1),
            (1, T, 3),
            (min(t + 1, 7), t + 1, 1),
            (min(t + 1, 33), T, 2),
            (t + 1, t + 1, 1),
            (1, t + 1, 2),
        ):
            if not torch.equal(one(t, queries, keys, rows), ref):
                return False
    return True


def probe_attention(H: int, Hkv: int, D: int, Dv: int, dtype: torch.dtype, device: torch.device) -> RowPlan:
    """The row plan attention's products need (query rows padded up to a count, or taken in tiles) for a query's
    output not to depend on the call, measured once per shape, dtype, device and thread count."""
    key = (H, Hkv, D, Dv, dtype, device.type, torch.get_num_threads())
    plan = _attention_plans.get(key)
    if plan is not None:
        return plan
    with torch.inference_mode():
        plan = next((p for p in CANDIDATES if _attention_consistent(p, H, Hkv, D, Dv, dtype, device)), FALLBACK)
    with _lock:
        _attention_plans[key] = plan
        report[f"attention {H}/{Hkv} heads x {D} {str(dtype).removeprefix('torch.')}"] = f"query rows {plan}"
    return plan
