"""Constrained decoding: replies that follow a JSON schema, are any JSON object, match a regular expression or are
one of fixed choices, by masking the logits of every step to the tokens that can continue a valid reply.

The grammar engine is llguidance (PyPI `llguidance`): it reads a `tokenizers` JSON as it is (no per-vocabulary
byte mapping to write), builds in about 0.15 s per tokenizer (kept) and under a millisecond per schema, and
computes a step's mask over SmolLM2's 49,152 tokens in 0.07-0.2 ms; a schema keyword it does not implement is an
error that names it. (Tried beside it: xgrammar 0.2.9 needs `tvm_ffi` and a vocabulary conversion, and
outlines-core a byte-level vocabulary conversion and a regex index per schema.)

A `Constraint` follows one reply: `apply(logits)` masks a row of logits in place (a token the grammar does not
allow gets -inf), `consume(token)` advances it. Once a reply is complete the only token allowed is an end token
(the ones given when it is made: EOS and a chat template's end of turn), so decoding stops there on its own.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import numpy as np
import torch

from lmforge import require
from lmforge.errors import LmforgeError

# JSON as json.dumps writes it ("key": value, items after ", "): llguidance's default lets any whitespace
# between tokens, and a small model would then sometimes spend its tokens on newlines and indentation
COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
_TOKENIZERS: dict[tuple, object] = {}
_LOCK = threading.Lock()
STRUCTURED = "structured output (a JSON schema, JSON object, regex, choices or tool calls)"  # (llguidance's job)


def _lltokenizer(tokenizer, vocab_size: int, ends: Sequence[int]):
    llguidance = require("llguidance", STRUCTURED, "structured")

    key = (id(tokenizer.tok), vocab_size, tuple(sorted(ends)))
    with _LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = (
                tokenizer.tok,
                llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size, eos_token=sorted(ends)),
            )
        return _TOKENIZERS[key][1]


def tool_call_schema(tools: Sequence[dict], name: str | None = None) -> dict:
    """The JSON schema of a call in the generic tool format, {"name": ..., "arguments": {...}}: one of `tools`
    (each {"name", "parameters"}: a JSON schema of the arguments), or the one called `name`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t["name"]}, "arguments": t.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
        if name is None or t["name"] == name
    ]
    if not options:
        raise LmforgeError(f"tool_choice names {name!r}, which is not one of the tools")
    return options[0] if len(options) == 1 else {"anyOf": options}


def grammar_for(
    json_schema: dict | str | None = None,
    json_object: bool = False,
    regex: str | None = None,
    choice: Sequence[str] | None = None,
    tools: Sequence[dict] | None = None,
    tool_choice: str = "required",
) -> str:
    """The llguidance grammar of one kind of constraint (exactly one given). tools: a tool call in the generic
    format (tool_call_schema) when tool_choice is "required" or a tool's name; with "auto", either such a call
    or a plain-text reply (one that does not open with "{")."""
    llguidance = require("llguidance", STRUCTURED, "structured")

    given = [
        k
        for k, v in (
            ("json_schema", json_schema),
            ("json_object", json_object),
            ("regex", regex),
            ("choice", choice),
            ("tools", tools),
        )
        if v
    ]
    if len(given) != 1:
        raise LmforgeError(
            f"give exactly one constraint (json_schema, json_object, regex, choice or tools), got "
            f"{', '.join(given) or 'none'}"
        )
    if tools:
        call = tool_call_schema(tools, None if tool_choice in ("auto", "required") else tool_choice)
        if tool_choice != "auto":
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(call), defaults=COMPACT)
        return llguidance.LLMatcher.grammar_from_lark(
            "start: call | text\ncall: %json "
            + json.dumps({**call, "x-guidance": COMPACT})
            + "\ntext: /[^{\\s][\\s\\S]*/\n"
        )
    if json_schema is not None:
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except json.JSONDecodeError as e:
                raise LmforgeError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(json_schema, dict):
            raise LmforgeError("a JSON schema must be a JSON object")
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(json_schema), defaults=COMPACT)
    if json_object:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=COMPACT)
    if regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(regex)
    if not all(isinstance(c, str) and c for c in choice):
        raise LmforgeError("choices must be non-empty strings")
    return llguidance.LLMatcher.grammar_from_regex("|".join(_escape(c) for c in choice))


def _escape(text: str) -> str:
    return "".join("\\" + ch if ch in r".^$*+?()[]{}|\/" else ch for ch in text)


def _one_line(message: str) -> str:
    """llguidance's message on one line: its first line and its own 'error:' line (it draws a caret diagram of
    the pattern in between)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    if not lines:
        return "the grammar is invalid"
    first = lines[0].split(": regex parse error", 1)[0]
    why = next((ln.removeprefix("error:").strip() for ln in lines[1:] if ln.startswith("error:")), None)
    return f"{first}: {why}" if why else first


class Constraint:
    """One reply's grammar state over the model's vocabulary (see the module notes)."""

    def __init__(self, tokenizer, grammar: str, vocab_size: int, ends: Sequence[int]) -> None:
        llguidance = require("llguidance", STRUCTURED, "structured")

        lt = _lltokenizer(tokenizer, vocab_size, ends)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lt)
        if failed:
            raise LmforgeError(f"unsupported constraint: {_one_line(messages[0] if messages else 'invalid grammar')}")
        self.matcher = llguidance.LLMatcher(lt, grammar)
        if self.matcher.is_error():
            raise LmforgeError(f"unsupported constraint: {_one_line(self.matcher.get_error())}")
        self.vocab_size = vocab_size

    @classmethod
    def make(cls, tokenizer, vocab_size: int, ends: Sequence[int], **spec) -> Constraint:
        """Constraint.make(tok, V, ends, json_schema=... | json_object=True | regex=... | choice=[...])."""
        return cls(tokenizer, grammar_for(**spec), vocab_size, ends)

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens that can come next."""
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[: self.vocab_size].astype(bool))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Mask one row of logits [vocab_size] in place; returns it."""
        logits.masked_fill_(~self.allowed().to(logits.device), float("-inf"))
        return logits

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise LmforgeError(f"token {token} does not continue the constrained reply ({self.matcher.get_error()})")

    @property
    def done(self) -> bool:
        """The reply is complete (only an end token may follow)."""
        return self.matcher.is_stopped()
