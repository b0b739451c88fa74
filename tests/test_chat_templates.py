"""Chat templates of today's families render as transformers renders them: templates written in each family's
style (the Jinja features they use: a dated system prompt with strftime_now, loop controls, namespace, tojson with
keywords, a raise_exception on a role the model lacks, trimming), rendered by lmforge and by transformers'
apply_chat_template on the same tokenizer."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lmforge.data.chat import apply_chat_template  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

TEMPLATES = {
    # Llama 3.x: header tokens, a system prompt dated today, the first user turn carries no system if none
    "llama3": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] | trim %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: ' + strftime_now('%d %b %Y') + '\\n\\n' "
        "+ system + '<|eot_id|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Gemma: no system role (folded into the first user turn), model instead of assistant
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}"
        "{% endif %}{% for m in loop_messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant/user/...') }}{% endif %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (first if loop.first else '') + m['content'] | trim + "
        "'<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # Qwen3 / SmolLM3: a namespace walking the turns backwards to find the last user query, loop controls
    "qwen3": (
        "{% set ns = namespace(last_query=messages | length - 1) %}"
        "{% for m in messages[::-1] %}{% if m['role'] == 'user' %}{% set ns.last_query = messages | length - 1 - "
        "loop.index0 %}{% break %}{% endif %}{% endfor %}"
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.index0 < ns.last_query %}"
        "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1].lstrip('\\n') + '<|im_end|>\\n' }}"
        "{% continue %}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Phi-3 / Phi-4-mini: tags per role, metadata as JSON with keywords
    "phi": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
        "{% if m['role'] == 'system' %}{{ {'lang': 'en', 'ö': 1} | tojson(indent=None, separators=(',', ':')) }}"
        "{% endif %}{{ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
        "{% else %}{{ eos_token }}{% endif %}"
    ),
}
CHATS = [
    [{"role": "user", "content": "  What is 12 + 30?  "}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a play."},
        {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHamlet."},
        {"role": "user", "content": "Another, café 你好 🤖"},
    ],
]


def tokenizers_for(template: str):
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    ref.chat_template = template
    return Tokenizer(raw, eos_token="</s>", bos_token="<s>", chat_template=template), ref


@pytest.mark.parametrize("family", list(TEMPLATES))
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_as_transformers(family, chat, add_generation_prompt):
    ours, ref = tokenizers_for(TEMPLATES[family])
    messages = CHATS[chat]
    want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert apply_chat_template(ours, messages, add_generation_prompt=add_generation_prompt) == want


def test_a_template_that_refuses_says_why():
    ours, _ = tokenizers_for(TEMPLATES["gemma"])
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(LmforgeError, match="alternate"):
        apply_chat_template(ours, bad)
