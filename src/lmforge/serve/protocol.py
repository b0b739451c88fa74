"""The OpenAI API's request shapes (the subset lmforge serves), validated by pydantic, and its error shape.

Ranges follow OpenAI's: a request outside them gets 400 with `{"error": {"message", "type", "param", "code"}}`.
Every number has bounds that the engine can take (a seed fits torch.Generator.manual_seed's 64 bits), so nothing
a client sends reaches the engine thread as something that fails there, where it would fail the whole batch.
Parameters OpenAI has and lmforge does not implement are refused by name rather than silently ignored.
Two extensions as in vLLM's server: `top_k`, and `ignore_eos` (generate max_tokens whatever the model says, for
load tests). `logit_bias` is OpenAI's: token ids (as strings) to a bias in [-100, 100] added to their logits.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from lmforge import missing_extra

try:  # (fastapi's own dependency: the [serve] extra)
    from pydantic import BaseModel, ConfigDict, Field, field_validator
except ImportError as e:
    raise missing_extra(e, "lmforge serve", "serve") from None

Prompt = str | list[str] | list[int] | list[list[int]]

# seeds are signed 64-bit (OpenAI's and vLLM's range); choice j of n samples with seed + j, which still fits the
# [-2**63, 2**64) that torch.Generator.manual_seed accepts since n <= 16
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


RESPONSE_FORMATS = (None, "text", "json_object", "json_schema", "regex", "choice")  # regex, choice: lmforge's own


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    TAKES_TOOLS: ClassVar[bool] = False

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=1)  # no upper bound: the sampler keeps at most the whole vocabulary
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    ignore_eos: bool = False  # extension (as vLLM's): run to max_tokens, for load tests
    logit_bias: dict[str, float] | None = None  # token id -> bias added to its logit (ids checked in serve.app)
    # response_format: see serve.app.response_constraint; the rest are accepted by OpenAI and not implemented here:
    # refused by name when set (see unsupported())
    tools: list[Any] | None = None
    response_format: dict | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.strip().isdigit():
                raise ValueError(f"logit_bias keys are token ids (whole numbers as strings), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stops

    def unsupported(self) -> str | None:
        if self.tools and not self.TAKES_TOOLS:
            return "tools"
        if self.response_format and self.response_format.get("type") not in RESPONSE_FORMATS:
            return "response_format"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return None


class CompletionRequest(_Sampling):
    prompt: Prompt
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[dict] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts are understood here
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise APIError(
                        400,
                        f"message content parts of type {p.get('type')!r} are not supported (text only)",
                        param="messages",
                    )
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tool_choice: str | dict | None = None
    TAKES_TOOLS: ClassVar[bool] = True  # (serve.app.tool_setup)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's errors -> one line and the offending parameter."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # a union (prompt: str | list[...]) reports one error per branch: name the parameter, not the branches
    loc = [x for x in loc if not x.startswith(("list[", "str", "int"))]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "missing":
        return f"missing required parameter: {param}", param
    return (f"invalid value for {param}: {msg}" if param else msg), param
