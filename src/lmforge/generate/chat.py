"""Chat: messages -> the model's chat template (Jinja, rendered as transformers does) -> generation.

The template comes with the model (tokenizer_config.json's `chat_template`, or a GGUF's
`tokenizer.chat_template`). Templates run in Jinja's sandbox: a model file cannot reach Python through them.
A model without a template gets ChatML.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

from lmforge.errors import LmforgeError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise LmforgeError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise LmforgeError(f"the model's chat template does not parse: {e}") from None


def apply_chat_template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise LmforgeError(f"a chat message needs role ({', '.join(ROLES)}) and string content, got {m!r}")
    from jinja2.exceptions import TemplateError

    template = _compile(tokenizer.chat_template or CHATML)
    try:
        return template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "")
    except TemplateError as e:
        raise LmforgeError(f"the model's chat template failed on these messages: {e}") from None


def chat(model, tokenizer, messages: Sequence[dict], max_new_tokens: int = 256, temperature: float = 0.7,
         top_k: int | None = 50, top_p: float | None = 0.9, repetition_penalty: float = 1.0,
         seed: int | None = None, on_text: Callable[[str], None] | None = None, compile: bool = False) -> str:
    """The assistant's reply to `messages` (a list of {"role", "content"}), streamed to on_text if given.
    compile: decode through torch.compile (see generate_ids)."""
    from lmforge.generate.sampling import generate

    prompt = apply_chat_template(tokenizer, messages)
    stream = (lambda _row, piece: on_text(piece)) if on_text else None
    return generate(model, tokenizer, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, on_text=stream,
                    end_token_ids=end_of_turn_ids(tokenizer), compile=compile)


def end_of_turn_ids(tokenizer) -> list[int]:
    """End-of-turn tokens of the common templates: they end a reply even where they are not the EOS token."""
    ends = [tokenizer.token_id(s) for s in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")]
    return [i for i in ends if i is not None]


def reply_all(model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 64,
              batch_size: int = 16) -> list[str]:
    """Greedy replies to many conversations, batched (for evaluation)."""
    from lmforge.generate.sampling import generate

    prompts = [apply_chat_template(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    out = [""] * len(prompts)
    ends = end_of_turn_ids(tokenizer)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        texts = generate(model, tokenizer, [prompts[i] for i in idx], max_new_tokens=max_new_tokens,
                         temperature=0.0, end_token_ids=ends)
        for i, t in zip(idx, texts):
            out[i] = t.strip()
    from lmforge.nn.packed import release_packed

    release_packed(model)  # the prepacked weight copies would otherwise outlive the evaluation
    return out
