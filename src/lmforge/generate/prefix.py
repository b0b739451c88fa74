"""A prefix cache for the serving engine: the keys and values of prompts already prefilled, kept so that a later
prompt that begins with the same tokens (the same system prompt, a chat's earlier turns, an evaluation harness's
repeated context) starts from them and prefills only the rest.

What an entry holds is the paged KV cache's business (lmforge.generate.kv: `save` hands out a prompt's whole
blocks by reference, `load` starts a new sequence's table with them, `forget` lets them go): this module only
decides which prompt's blocks to keep, and for how long. An entry's payload needs an `nbytes`.

Entries are whole prompts cut to a multiple of `block` tokens (so that prompts which differ only near the end
share the entry), keyed by their token ids; a lookup takes the longest shared prefix of any entry, again in whole
blocks, and always leaves at least one token of the new prompt to run (its logits pick the first new token). An
entry that extends an older one replaces it. Least recently used entries go first once the stored bytes would
pass `max_bytes`.

The reused keys and values are the ones the model computed for those tokens before: with the int4 / int8
kernels (row by row, the same result whatever the batch) the second prompt's state is the one a full prefill
gives; in fp32 the products of a pass of other length can round differently in the last bits, which can settle
an exact tie of two tokens the other way.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any


class PrefixCache:
    """Prompts' keys and values in whole blocks of `block` tokens, at most `max_bytes` of them (least recently
    used first out); `forget(payload)` is called for each entry let go."""

    def __init__(self, max_bytes: int, block: int = 64, forget: Callable[[Any], None] = lambda kv: None) -> None:
        self.max_bytes, self.block, self.forget = max_bytes, block, forget
        self.entries: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.reused_tokens = 0

    def lookup(self, prompt: Sequence[int]) -> tuple[int, Any]:
        """(n, kv): the longest stored prefix of `prompt` in whole blocks, shorter than the prompt, and the
        payload that holds it (n = 0, None when nothing is shared)."""
        best, found = 0, None
        limit = len(prompt) - 1
        for key in self.entries:
            n = 0
            for a, b in zip(key, prompt[:limit]):
                if a != b:
                    break
                n += 1
            n -= n % self.block
            if n > best:
                best, found = n, key
        if found is None:
            self.misses += 1
            return 0, None
        self.entries.move_to_end(found)
        self.hits += 1
        self.reused_tokens += best
        return best, self.entries[found]

    def store(self, prompt: Sequence[int], save: Callable[[int], Any]) -> None:
        """Keep the prompt's keys and values (save(n): a payload holding the first n positions of its sequence)
        in whole blocks, unless an entry holds them already."""
        n = len(prompt) - len(prompt) % self.block
        if n == 0:
            return
        key = tuple(prompt[:n])
        for old in list(self.entries):
            if len(old) >= n and old[:n] == key:  # already held (as this prompt or a longer one)
                self.entries.move_to_end(old)
                return
        kv = save(n)
        if kv.nbytes > self.max_bytes:
            self.forget(kv)
            return
        for old in [old for old in self.entries if len(old) < n and key[: len(old)] == old]:
            self._drop(self.entries.pop(old))  # the new entry serves the older one's prompts too
        self.entries[key] = kv
        self.bytes += kv.nbytes
        while self.bytes > self.max_bytes:
            self._drop(self.entries.popitem(last=False)[1])

    def _drop(self, kv: Any) -> None:
        self.bytes -= kv.nbytes
        self.forget(kv)

    def clear(self) -> None:
        for kv in self.entries.values():
            self.forget(kv)
        self.entries.clear()
        self.bytes = 0
