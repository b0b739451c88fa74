"""Constrained decoding (llguidance): replies that follow a JSON schema, are a JSON object, match a regex or are
one of fixed choices, in Python (generate) and on the CLI; unsupported schemas are clear errors."""

import json
import re

import jsonschema
import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.generate import generate

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def smol():
    from lmforge.interop import load_pretrained

    return load_pretrained("smollm2-135m-instruct")  # the file's int4 weights are what serve uses; any will do here


def test_every_sampled_reply_follows_its_constraint(smol):
    from lmforge.data.chat import apply_chat_template
    from lmforge.generate.chat import end_of_turn_ids

    model, tok = smol
    prompt = apply_chat_template(tok, [{"role": "user", "content": "Describe a person in JSON."}])
    kw = dict(max_new_tokens=80, temperature=1.0, seed=3, end_token_ids=end_of_turn_ids(tok))
    for text in generate(model, tok, [prompt] * 4, json_schema=PERSON, **kw):  # sampled: four different replies
        jsonschema.validate(json.loads(text), PERSON)
    for text in generate(model, tok, [prompt] * 2, json_object=True, **kw):
        assert isinstance(json.loads(text), dict)
    for text in generate(model, tok, [prompt] * 2, regex=r"[A-Z][a-z]{2,8} is [0-9]{1,2}", **kw):
        assert re.fullmatch(r"[A-Z][a-z]{2,8} is [0-9]{1,2}", text), text
    assert set(generate(model, tok, [prompt] * 3, choice=["yes", "no", "maybe (a/b)"], **kw)) <= {
        "yes",
        "no",
        "maybe (a/b)",
    }


def test_unsupported_or_bad_constraints_are_clear_errors(smol):
    model, tok = smol
    with pytest.raises(LmforgeError, match="not"):
        generate(model, tok, "x", json_schema={"not": {"type": "string"}})
    with pytest.raises(LmforgeError, match="not valid JSON"):
        generate(model, tok, "x", json_schema="{oops")
    with pytest.raises(LmforgeError, match="exactly one constraint"):
        generate(model, tok, "x", regex="a", choice=["b"])


def test_constraint_masks_and_ends_on_an_end_token(smol):
    from lmforge.generate.constrain import Constraint

    model, tok = smol
    c = Constraint.make(tok, model.config.vocab_size, [tok.eos_id], choice=["yes"])
    allowed = c.allowed()
    assert allowed.dtype == torch.bool and allowed.shape == (model.config.vocab_size,) and 0 < allowed.sum() < 10
    for t in tok.encode("yes"):
        c.consume(t)
    assert c.done and c.allowed().nonzero().flatten().tolist() == [tok.eos_id]
    with pytest.raises(LmforgeError, match="does not continue"):
        c.consume(tok.encode("no")[0])


@pytest.mark.slow  # (29 s; the constraints themselves: test_every_sampled_reply_follows_its_constraint)
def test_cli_generate_json_schema(tmp_path, capsys):
    from conftest import call_cli

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(PERSON))
    r = call_cli(
        capsys,
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--prompt",
        "A person as JSON:",
        "--json-schema",
        str(schema),
        "--max-new-tokens",
        "80",
        "--temperature",
        "0",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    jsonschema.validate(json.loads(json.loads(r.stdout)[0]["text"]), PERSON)
    (tmp_path / "bad.json").write_text("{")
    r = call_cli(
        capsys,
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--prompt",
        "x",
        "--json-schema",
        str(tmp_path / "bad.json"),
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not valid JSON" in r.stderr
