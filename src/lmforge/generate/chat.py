"""Chat: messages -> the model's chat template (`lmforge.data.chat.apply_chat_template`) -> generation."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmforge.data.chat import apply_chat_template
from lmforge.errors import LmforgeError
from lmforge.generate.sampling import generate
from lmforge.nn.packed import release_packed


def chat(
    model,
    tokenizer,
    messages: Sequence[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int | None = 50,
    top_p: float | None = 0.9,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    compile: bool = False,
    draft=None,
) -> str:
    """The assistant's reply to `messages` (a list of {"role", "content"}), streamed to on_text if given.
    compile: decode through torch.compile; draft: speculative decoding (see generate_ids). A reply longer than
    what the model's context leaves after the conversation is shortened to fit, with a one-line note on stderr
    (as transformers does); a conversation that fills the context is an error."""
    prompt = apply_chat_template(tokenizer, messages)
    used, ctx = len(tokenizer.encode(prompt)), model.config.max_seq_len
    if used >= ctx:
        raise LmforgeError(
            f"the conversation ({used} tokens) fills the model's context of {ctx} tokens: nothing is "
            "left for a reply; shorten it"
        )
    if max_new_tokens > ctx - used:
        print(
            f"lmforge: note: the reply gets at most {ctx - used} new tokens (not {max_new_tokens}): the model's "
            f"context is {ctx} tokens and the conversation takes {used}",
            file=sys.stderr,
        )
        max_new_tokens = ctx - used
    stream = (lambda _row, piece: on_text(piece)) if on_text else None
    return generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        seed=seed,
        on_text=stream,
        end_token_ids=end_of_turn_ids(tokenizer),
        compile=compile,
        draft=draft,
    )


def chat_session(
    model, tokenizer, system: str | None = None, read: Callable[[str], str] | None = None, **kw: Any
) -> list[dict]:
    """`lmforge chat` without --prompt: a conversation on the terminal, replies streamed. /reset clears the
    history, /system TEXT sets the system prompt, /quit (or end of input) ends. Ctrl-C stops a reply and keeps
    the session; so does a user error (the conversation outgrew the context). `kw` goes to chat(). Returns the
    history."""
    read = read or input  # (looked up now: a caller or a test may have replaced input)
    history: list[dict] = [{"role": "system", "content": system}] if system else []

    def out(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    print(
        "chat: type a message; /reset clears the history, /system TEXT sets the system prompt, /quit ends",
        file=sys.stderr,
    )
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return history
        if text in ("/quit", "/exit"):
            return history
        if text == "/reset":
            history = [m for m in history if m["role"] == "system"]
        elif text.startswith("/system"):
            history = [{"role": "system", "content": text[len("/system") :].strip()}] + [
                m for m in history if m["role"] != "system"
            ]
        elif text:
            history.append({"role": "user", "content": text})
            sys.stdout.write("assistant> ")
            try:
                reply = chat(model, tokenizer, history, on_text=out, **kw)
            except KeyboardInterrupt:  # stop this reply, keep the session
                history.pop()
                print()
                continue
            except LmforgeError as e:  # e.g. the conversation outgrew the context: keep the session
                history.pop()
                print(f"\nlmforge: {e} (type /reset to clear the history)", file=sys.stderr)
                continue
            print()
            history.append({"role": "assistant", "content": reply})


def end_of_turn_ids(tokenizer) -> list[int]:
    """End-of-turn tokens of the common templates: they end a reply even where they are not the EOS token."""
    ends = [tokenizer.token_id(s) for s in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>")]
    return [i for i in ends if i is not None]


def reply_all(
    model, tokenizer, conversations: Sequence[Sequence[dict]], max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """Greedy replies to many conversations, batched (for evaluation)."""
    prompts = [apply_chat_template(tokenizer, c) for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    out = [""] * len(prompts)
    ends = end_of_turn_ids(tokenizer)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        texts = generate(
            model,
            tokenizer,
            [prompts[i] for i in idx],
            max_new_tokens=max_new_tokens,
            temperature=0.0,
            end_token_ids=ends,
        )
        for i, t in zip(idx, texts):
            out[i] = t.strip()

    release_packed(model)  # the prepacked weight copies would otherwise outlive the evaluation
    return out
