"""Paged KV memory for batched decoding: the keys and values of every running sequence in fixed-size blocks.

Each layer's keys (and values) live in one pool, [n_kv_head, blocks, BLOCK, head_dim]; a sequence holds a table of
the blocks its positions fill (position p is in block table[p // BLOCK], at p % BLOCK), taken from a free list as
it grows and given back when it ends. A short reply so holds a few blocks, not the longest sequence's length, and
the memory a server uses follows the tokens it holds. The prefix cache (lmforge.generate.prefix) keeps a
prompt's whole blocks by reference (a count per block), and a later prompt that begins the same way starts its
table with those blocks: nothing is copied.

Layers with a sliding window (Mistral, the local layers of Gemma 2 / 3) form their own group, with their own
pool and tables: a block that has slid wholly out of the window is given back (its table entry points at the
null block from then on), so such a layer holds a window of keys however long the sequence grows.

A pool is reserved whole at the start (slots x the longest sequence, in blocks) but only touched as blocks are
first handed out, lowest numbers first: the memory the process holds grows with the most tokens ever held at
once, never moves (no reallocation pauses) and does not creep. Block 0 is the null block: zeros, never handed
out, what a table's unused entries point at.

Blocks are stored in the model's compute dtype, or narrower (`dtype`): bfloat16 (half of float32), or int8 with
a float32 scale per head and position (absmax / 127 of each key's and value's vector: 68 bytes a head and
position at SmolLM2's head_dim 64, against 256 in float32); they are widened as they are gathered.

A step is attention over each row's blocks gathered into one scratch buffer, laid out heads-first
([n_kv_head, rows, positions, head_dim]) so that the gather is the only copy: lmforge.nn.attention's
`decode_attention` takes that layout as it is. This storage does not decide what runs (the engine's scheduler
does) nor compute attention (the layer's own `Attention.core` does); it writes keys, gathers them, and keeps
the tables.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.nn import invariant

BLOCK = invariant.KEY_BLOCK  # positions per block: a row's gathered keys are whole blocks of batch-invariant attention


@dataclass
class Blocks:
    """Whole blocks of one sequence's first `n` positions, held by reference (the prefix cache's entries):
    ids[g] are group g's block ids (0 where a windowed layer had already let one go)."""

    n: int
    ids: list[list[int]]
    nbytes: int


@dataclass
class _Step:
    """What the next forward runs, as the cache needs it (set by prefill / decode / mixed, cleared by advance)."""

    kind: str  # "prefill", "decode" or "mixed"
    rows: int = 0  # decode rows 0..rows-1 (idle ones compute on a dummy token and write nothing)
    pos: torch.Tensor | None = None  # their positions
    act: torch.Tensor | None = None  # the active rows' indices
    active: list[int] = field(default_factory=list)
    slot: int = -1  # the prefill's (or the chunk's) sequence
    start: int = 0  # its past length
    n: int = 0  # its new tokens
    layers: tuple[int, int] = (0, 0)  # the layers the chunk goes through (mixed steps)
    tables: list[torch.Tensor] = field(default_factory=list)  # per group: the decode rows' block tables [rows, nb]
    runs: list[int | None] = field(default_factory=list)  # per group: a lone row's first block, if its are in a run
    slots: list[torch.Tensor | None] = field(default_factory=list)  # per group: where the rows write (made once)


class _Group:
    """The layers that share one window (None: all positions): their pools, free list and block tables."""

    def __init__(self, layers, window, slots, n_blocks, shape, device, dtype) -> None:
        self.layers, self.window = list(layers), window
        Hkv, D = shape
        # reserved, not touched: pages are first written when a block is handed out (lowest numbers first)
        self.k = {i: torch.empty((Hkv, n_blocks, BLOCK, D), device=device, dtype=dtype) for i in layers}
        self.v = {i: torch.empty((Hkv, n_blocks, BLOCK, D), device=device, dtype=dtype) for i in layers}
        # int8 blocks: a scale per head and position beside them (absmax / 127 of that key's or value's vector)
        self.ks, self.vs = {}, {}
        if dtype == torch.int8:
            self.ks = {i: torch.empty((Hkv, n_blocks, BLOCK), device=device) for i in layers}
            self.vs = {i: torch.empty((Hkv, n_blocks, BLOCK), device=device) for i in layers}
        for pool in self.pools():
            pool[:, 0].zero_()  # the null block
        self.free = list(range(1, n_blocks))  # a heap: the lowest (already touched) numbers go first
        self.refs = [0] * n_blocks
        self.tables: list[list[int]] = [[] for _ in range(slots)]

    def take(self) -> int:
        if not self.free:
            raise LmforgeError(
                "the KV memory is full (every block is held by a running sequence or the prefix cache); "
                "lower --max-batch or --cache-mb, or shorten the requests"
            )
        b = heapq.heappop(self.free)
        self.refs[b] = 1
        for pool in self.pools():
            pool[:, b].zero_()  # (stale values are finite either way; zeros keep a fresh block's tail clean)
        return b

    def pools(self) -> list[torch.Tensor]:
        return [*self.k.values(), *self.v.values(), *self.ks.values(), *self.vs.values()]

    def hold(self, b: int) -> None:
        if b:
            self.refs[b] += 1

    def drop(self, b: int) -> None:
        if b:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                heapq.heappush(self.free, b)

    def grow(self, slot: int, n: int) -> None:
        """Blocks for the slot's first n positions."""
        t = self.tables[slot]
        while len(t) * BLOCK < n:
            t.append(self.take())

    def slide(self, slot: int, length: int) -> None:
        """Give back the blocks a windowed layer will not read again: wholly before the window of the next
        query, with one block to spare (a speculative pass may take back up to BLOCK drafted positions)."""
        if self.window is None:
            return
        t = self.tables[slot]
        for j in range(max(0, (length - self.window) // BLOCK - 1)):
            if t[j]:
                self.drop(t[j])
                t[j] = 0

    def release(self, slot: int) -> None:
        for b in self.tables[slot]:
            self.drop(b)
        self.tables[slot] = []


def _narrow(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., D] as stored: in dtype, or for int8 the rounded x / scale and the scale (absmax / 127 of each
    vector: per head and position)."""
    if dtype != torch.int8:
        return x.to(dtype), None  # (under autocast k and v may come in another dtype)
    scale = x.float().abs().amax(-1).clamp(min=1e-12) / 127
    return (x.float() / scale[..., None]).round_().clamp_(-127, 127).to(torch.int8), scale


def _run(t: list[int]) -> int | None:
    """t's first block if t is a run of consecutive block numbers (readable in place), else None."""
    return t[0] if t and t[0] and t[-1] - t[0] == len(t) - 1 and all(b == t[0] + j for j, b in enumerate(t)) else None


class PagedKVCache:
    """A KV cache for continuous batching: one sequence per slot, each with its own length and its own blocks.

    Three kinds of step use it, each announced before the model's forward: `prefill(slot, n)` runs n tokens of
    one sequence (its prompt, or a speculative pass's drafts) after what it holds; `decode(rows)` runs one token
    for each of rows 0..max(rows) at its own position and returns the mask that keeps every row to its own keys;
    `mixed(rows, slot, n, layers)` runs a decode step and a chunk of a long prompt as one row (chunked prefill,
    see `attend`). The forward's layers call `update` (or `attend`), and `advance` ends the step."""

    def __init__(
        self,
        n_layer: int,
        slots: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        windows: Sequence[int | None] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        extra_bytes: int = 0,
        compute: torch.dtype | None = None,
    ) -> None:
        self.n_layer, self.slots, self.max_len = n_layer, slots, max_len
        # blocks are stored in dtype; the keys a layer attends over are gathered in its compute dtype
        self.device, self.dtype, self.compute = torch.device(device), dtype, compute or dtype
        windows = list(windows) if windows is not None else [None] * n_layer
        # bytes of one block across all layers (keys and values): what the prefix cache's budget counts
        width = head_dim * torch.empty((), dtype=dtype).element_size() + (4 if dtype == torch.int8 else 0)
        self.block_bytes = 2 * n_layer * n_kv_head * BLOCK * width
        # every slot at its longest, and what the prefix cache may hold besides (extra_bytes)
        n_blocks = 1 + slots * -(-max_len // BLOCK) + extra_bytes // self.block_bytes
        shape = (n_kv_head, head_dim)
        self.groups = [
            _Group([i for i in range(n_layer) if windows[i] == w], w, slots, n_blocks, shape, self.device, dtype)
            for w in dict.fromkeys(windows)
        ]
        self.group_of = {i: g for g in self.groups for i in g.layers}
        self.lens = [0] * slots  # filled positions per slot
        self._step: _Step | None = None
        self._scratch: dict[str, torch.Tensor] = {}
        self._heads_index: tuple = ()  # (table, its gather index): the last table gathered, for the next layer

    @classmethod
    def for_model(cls, model, slots: int, max_len: int, dtype: torch.dtype | None = None, extra_bytes: int = 0):
        """The cache for a decoder (its layers' windows read from its config), stored in `dtype`, by default the
        dtype its final norm computes in (the head and embedding may be quantized)."""
        c, p = model.config, model.norm.weight
        windows = [c.window(i) for i in range(c.n_layer)] if hasattr(c, "window") else None
        return cls(
            c.n_layer,
            slots,
            c.n_kv_head,
            c.head_dim,
            max_len,
            windows,
            p.device,
            dtype or p.dtype,
            extra_bytes,
            p.dtype,
        )

    # ------------------------------------------------------------------------------------------------------------
    # announcing a step

    @property
    def length(self) -> int:  # the past length of the rows in this step (a prefill's start)
        return self._step.start if self._step is not None and self._step.kind == "prefill" else 0

    def _grow(self, slot: int, n: int) -> None:
        if n > self.max_len:
            raise LmforgeError(f"KV cache full: {n} positions > max_len {self.max_len}")
        for g in self.groups:
            g.grow(slot, n)

    def prefill(self, slot: int, n: int) -> None:
        """The next forward runs n tokens of one sequence into `slot` (continuing whatever it holds)."""
        self._grow(slot, self.lens[slot] + n)
        self._step = _Step("prefill", slot=slot, start=self.lens[slot], n=n)

    def decode(self, active: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The next forward runs one token for each row 0..max(active) (rows not in `active` are idle: they
        compute on a dummy token at position 0, write nothing and are not advanced: one may be a prompt half
        read, see `mixed`). Returns (position_ids [rows, 1], bool mask [rows, 1, 1, K]); every row sees its own
        keys only."""
        self._step = self._rows(active, "decode")
        pos = self._step.pos
        return pos[:, None], self._rows_mask(pos)

    def mixed(self, active: Sequence[int], slot: int, n: int, layers: tuple[int, int] | None = None) -> torch.Tensor:
        """The next forward runs, as one row of rows + n tokens, a decode step for rows 0..max(active) (as
        `decode`) and the next n prompt tokens of `slot` (a chunk of its prefill, which must not be an active
        row) through `layers` [a, b) (default: all; a chunk run a few layers at a time stays at the same
        positions until its last layer, see DecoderLM.staged_step). Returns the position ids [1, rows + n];
        attention goes through `attend`."""
        start = self.lens[slot]
        self._grow(slot, start + n)
        step = self._rows(active, "mixed")
        step.slot, step.start, step.n, step.layers = slot, start, n, layers or (0, self.n_layer)
        self._step = step
        return torch.cat([step.pos, torch.arange(start, start + n, device=self.device)])[None]

    def _rows(self, active: Sequence[int], kind: str) -> _Step:
        """A decode step's rows 0..max(active): positions (idle rows at 0), the active rows' blocks grown for
        their new token, and every row's block table per group (padded with the null block)."""
        rows = max(active) + 1
        lens = [self.lens[i] if i in active else 0 for i in range(rows)]
        for i in active:
            self._grow(i, lens[i] + 1)
        nb = -(-(max(lens) + 1) // BLOCK)
        tables, runs = [], []
        for g in self.groups:
            t = [(g.tables[i][:nb] if i in active else []) for i in range(rows)]
            tables.append(torch.tensor([r + [0] * (nb - len(r)) for r in t], dtype=torch.long, device=self.device))
            runs.append(_run(t[0]) if rows == 1 and len(t[0]) == nb else None)
        return _Step(
            kind,
            rows=rows,
            pos=torch.tensor(lens, dtype=torch.long, device=self.device),
            act=torch.tensor(list(active), dtype=torch.long, device=self.device),
            active=list(active),
            tables=tables,
            runs=runs,
            slots=[None] * len(self.groups),
        )

    def _rows_mask(self, pos: torch.Tensor) -> torch.Tensor:
        """[rows, 1, 1, K] (K: the gathered positions, whole blocks): each row sees its own keys up to its
        position."""
        k_len = self._step.tables[0].size(1) * BLOCK
        return (torch.arange(k_len, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]

    # ------------------------------------------------------------------------------------------------------------
    # the layers' side

    def _write(self, layer: int, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [heads, n, D]: one sequence's positions start..start + n - 1."""
        g = self.group_of[layer]
        t = g.tables[slot]
        p = start
        end = start + k.size(1)
        (k, ks), (v, vs) = _narrow(k, self.dtype), _narrow(v, self.dtype)
        while p < end:  # block by block: a run of positions in one block is one copy
            b, o = divmod(p, BLOCK)
            m = min(BLOCK - o, end - p)
            g.k[layer][:, t[b], o : o + m] = k[:, p - start : p - start + m]
            g.v[layer][:, t[b], o : o + m] = v[:, p - start : p - start + m]
            if ks is not None:
                g.ks[layer][:, t[b], o : o + m] = ks[:, p - start : p - start + m]
                g.vs[layer][:, t[b], o : o + m] = vs[:, p - start : p - start + m]
            p += m

    def _write_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """The active rows' new keys and values (k, v [rows, heads, D]) at their positions; idle rows write
        nothing (one may be a prompt half read)."""
        s = self._step
        g = self.group_of[layer]
        gi = self.groups.index(g)
        if s.slots[gi] is None:  # (once per step and group: every layer writes at the same places)
            Hkv, NB = g.k[layer].shape[:2]
            act, pos = s.act, s.pos[s.act]
            at = s.tables[gi][act, pos // BLOCK] * BLOCK + pos % BLOCK  # [n]: each row's slot in a head's pool
            s.slots[gi] = (torch.arange(Hkv, device=self.device)[:, None] * (NB * BLOCK) + at[None]).reshape(-1)
        at = s.slots[gi]  # [heads * n] rows of the pools viewed as [heads * blocks * BLOCK, D]
        for pool, scales, x in ((g.k[layer], g.ks.get(layer), k), (g.v[layer], g.vs.get(layer), v)):
            x, sc = _narrow(x[s.act].transpose(0, 1), self.dtype)  # [heads, n, D]
            pool.view(-1, pool.size(-1)).index_copy_(0, at, x.reshape(-1, x.size(-1)))
            if sc is not None:
                scales.view(-1).index_copy_(0, at, sc.reshape(-1))

    def _gather(self, layer: int, table: torch.Tensor, run: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks of `table` [rows, nb] as keys and values [rows, heads, nb * BLOCK, D], laid out heads-first
        in a scratch buffer reused by every layer (one copy; see the module notes). A lone row whose blocks are
        a run of consecutive numbers starting at `run` (a single stream's are) is read in place instead."""
        g = self.group_of[layer]
        pool = g.k[layer]
        Hkv, _, _, D = pool.shape
        rows, nb = table.shape
        quant = self.dtype == torch.int8
        if run is not None:
            out = []
            for src, sc in ((pool, g.ks.get(layer)), (g.v[layer], g.vs.get(layer))):
                x = src[:, run : run + nb].reshape(1, Hkv, nb * BLOCK, D)
                x = x * sc[:, run : run + nb].reshape(1, Hkv, nb * BLOCK, 1) if quant else x
                out.append(x.to(self.compute))
            return out[0], out[1]
        NB = pool.size(1)
        last = self._heads_index
        if last and last[0] is table:  # (every layer of a step gathers the same table)
            idx = last[1]
        else:  # block b of head h is row h * NB + b of the pool viewed as [heads * blocks, BLOCK * D]
            idx = (torch.arange(Hkv, device=self.device)[:, None] * NB + table.reshape(1, -1)).reshape(-1)
            self._heads_index = (table, idx)
        out = []
        for name, src, sc in (("k", pool, g.ks.get(layer)), ("v", g.v[layer], g.vs.get(layer))):
            x = self._buffer(name, (Hkv * rows * nb, BLOCK * D), self.compute)
            rows_of = src.view(Hkv * NB, BLOCK * D)  # (a copy of whole rows: dim 0 of a matrix is the fast gather)
            if self.dtype == self.compute:
                torch.index_select(rows_of, 0, idx, out=x)
            else:  # stored narrower than computed: gathered, then widened (int8: times each vector's scale)
                narrow = torch.index_select(rows_of, 0, idx, out=self._buffer(name + "+", x.shape, self.dtype))
                if quant:
                    scales = self._buffer(name + "s", (Hkv * rows * nb, BLOCK), torch.float32)
                    torch.index_select(sc.view(Hkv * NB, BLOCK), 0, idx, out=scales)
                    torch.mul(narrow.view(-1, BLOCK, D), scales[..., None], out=x.view(-1, BLOCK, D))
                else:
                    x.copy_(narrow)
            out.append(x.view(Hkv, rows, nb * BLOCK, D).transpose(0, 1))
        return out[0], out[1]

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A scratch tensor of this shape, reused by every layer and step (grown by doubling: rarely)."""
        need = math.prod(shape)
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < need:
            size = max(need, 2 * buf.numel() if buf is not None else 0)
            buf = self._scratch[name] = torch.zeros(size, device=self.device, dtype=dtype)
        return buf[:need].view(shape)

    def _slot_kv(self, layer: int, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's first n keys and values, [1, heads, n, D]."""
        g = self.group_of[layer]
        t = g.tables[slot][: -(-n // BLOCK)]
        k, v = self._gather(layer, torch.tensor([t], dtype=torch.long, device=self.device), _run(t))
        return k[:, :, :n], v[:, :, :n]

    @property
    def attends(self) -> bool:
        """Whether this step's attention runs through `attend` (a mixed step) rather than update + attention."""
        return self._step is not None and self._step.kind == "mixed"

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, core: Callable) -> torch.Tensor:
        """A mixed step's attention, q/k/v [1, heads, rows (+ n), D]: the first `rows` tokens each against its own
        row's keys (as a decode step), and in the chunk's layers the last n causally against their slot's,
        written to the cache first. `core(q, k, v, mask, decoding)` is the layer's own attention
        (Attention.core: its scale, window and soft-capping)."""
        s = self._step
        rows = s.rows
        self._write_rows(layer, k[0, :, :rows].transpose(0, 1), v[0, :, :rows].transpose(0, 1))
        K, V = self._gather(layer, s.tables[self.groups.index(self.group_of[layer])])
        y_rows = core(q[0, :, :rows].transpose(0, 1)[:, :, None], K, V, self._rows_mask(s.pos), decoding=True)[
            :, :, 0
        ].transpose(0, 1)[None]  # [1, heads, rows, D]
        a, b = s.layers
        if not a <= layer < b:
            return y_rows
        self._write(layer, s.slot, s.start, k[0, :, rows:], v[0, :, rows:])
        K, V = self._slot_kv(layer, s.slot, s.start + s.n)
        y_chunk = core(q[:, :, rows:], K, V, decoding=True)  # causal: the chunk's queries are the last n keys
        return torch.cat([y_rows, y_chunk], dim=2)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys and values (k, v [B, heads, T, D]); return the keys and values its queries
        attend over."""
        s = self._step
        if s.kind == "prefill":
            self._write(layer, s.slot, s.start, k[0], v[0])
            if s.start == 0 and self.dtype == self.compute:
                return k, v  # a whole prompt: its own keys are all it sees (as stored: stored narrower, gathered)
            return self._slot_kv(layer, s.slot, s.start + s.n)
        self._write_rows(layer, k[:, :, 0], v[:, :, 0])
        g = self.groups.index(self.group_of[layer])
        return self._gather(layer, s.tables[g], s.runs[g])

    def advance(self, n: int) -> None:
        s = self._step
        if s.kind == "mixed":
            for i in s.active:
                self.lens[i] += 1
            if s.layers[1] == self.n_layer:  # the chunk's last layer ran: its positions are filled
                self.lens[s.slot] += s.n
            touched = [*s.active, s.slot]
        elif s.kind == "prefill":
            self.lens[s.slot] += n
            touched = [s.slot]
        else:
            for i in s.active:
                self.lens[i] += n
            touched = s.active
        for g in self.groups:
            for i in touched:
                g.slide(i, self.lens[i])
        self._step = None

    # ------------------------------------------------------------------------------------------------------------
    # sequences

    def release(self, slot: int) -> None:
        """The slot's sequence ended: its blocks go back (those the prefix cache holds stay with it)."""
        for g in self.groups:
            g.release(slot)
        self.lens[slot] = 0

    def save(self, slot: int, n: int) -> Blocks:
        """The slot's first n positions (whole blocks), held by reference for the prefix cache."""
        ids = [g.tables[slot][: n // BLOCK] for g in self.groups]
        for g, t in zip(self.groups, ids):
            for b in t:
                g.hold(b)
        return Blocks(n, [list(t) for t in ids], len(ids[0]) * self.block_bytes)

    def load(self, slot: int, kept: Blocks, n: int) -> int:
        """Start an empty slot with the first n positions of kept blocks (see save) and return how many it
        took: n, or fewer where a windowed layer had let go of a block it would need."""
        n -= n % BLOCK
        for g, t in zip(self.groups, kept.ids):
            if g.window is not None:
                while n and 0 in t[max(0, (n - g.window) // BLOCK) : n // BLOCK]:
                    n -= BLOCK
        for g, t in zip(self.groups, kept.ids):
            g.tables[slot] = list(t[: n // BLOCK])
            for b in g.tables[slot]:
                g.hold(b)
        self.lens[slot] = n
        return n

    def forget(self, kept: Blocks) -> None:
        """The prefix cache let an entry go: its blocks' references go with it."""
        for g, t in zip(self.groups, kept.ids):
            for b in t:
                g.drop(b)

    @property
    def blocks_used(self) -> int:
        """Blocks held now (any layer group's, by a sequence or the prefix cache)."""
        return sum(len(g.refs) - 1 - len(g.free) for g in self.groups)
