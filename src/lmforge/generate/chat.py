"""Chat: messages -> the model's chat template (`lmforge.data.chat.apply_chat_template`) -> generation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lmforge.data.chat import apply_chat_template


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
