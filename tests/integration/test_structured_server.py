"""Structured outputs through the server and the official openai client: response_format json_schema and json_object,
vLLM's guided_* and structured_outputs fields, 400s that name the unsupported part, a constrained and a free request
sharing a batch, streaming, and "length" when max_tokens ends the output before the grammar completes."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from tests.integration.conftest import MODEL_NAME, ServerProcess, chat_400

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0},
                         "city": {"enum": ["Paris", "Tokyo", "Lima"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Invent a person: name, age and city, as JSON."}]
# greedy with a frequency penalty: deterministic, and it keeps the small model out of repetition loops
STEADY = {"temperature": 0, "frequency_penalty": 1.0}


def person_format(schema: dict = PERSON) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.fixture
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def test_json_schema_response_parses_and_validates(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=80, n=2, seed=5,
                                       response_format=person_format(), temperature=0.8)
    for choice in r.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_and_vllm_fields_on_both_endpoints(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=80, **STEADY,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=MODEL_NAME, prompt="The year the war ended:", max_tokens=8, **STEADY,
                                  extra_body={"guided_regex": r"1[89][0-9]{2}"})
    assert re.fullmatch(r"1[89][0-9]{2}", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL_NAME, prompt=["Is water wet?", "Is fire cold?"], max_tokens=4, **STEADY,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert [c.text in ("yes", "no") for c in r.choices] == [True, True]
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=80, **STEADY,
                                       extra_body={"guided_json": json.dumps(PERSON)})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_streamed_deltas_join_into_a_valid_instance(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=80, **STEADY, stream=True,
                                            response_format=person_format())
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": person_format({"type": "object", "not": {"required": ["a"]}})},
     "response_format.json_schema.schema", "'not'"),
    ({"response_format": person_format({"type": "string", "pattern": "^[a-z]+$", "maxLength": 4})},
     "response_format.json_schema.schema", "'pattern' together with 'minLength'/'maxLength'"),
    ({"response_format": person_format({"type": "wibble"})}, "response_format.json_schema.schema",
     'Unsupported type "wibble"'),
    ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar", "EBNF"),
    ({"guided_choice": []}, "guided_choice", "empty"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "at most one"),
    ({"structured_outputs": {}}, "structured_outputs", "must set one"),
    ({"guided_regex": "a+", "min_tokens": 2}, "min_tokens", "structured output"),
])
def test_unsupported_constraints_are_400s_that_say_why(server: ServerProcess, body: dict, param: str,
                                                       words: str) -> None:
    error = chat_400(server, ASK, body)
    assert error["param"] == param and words in error["message"], error


def test_max_tokens_before_the_grammar_completes_is_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=4, temperature=0,
                                       response_format=person_format())
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_constrained_and_free_requests_share_a_batch(server: ServerProcess, client: openai.OpenAI) -> None:
    free_messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    alone = client.chat.completions.create(model=MODEL_NAME, messages=free_messages, max_tokens=24, temperature=0)

    async def together() -> list:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                                      timeout=120) as aclient:
            constrained = [aclient.chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=80, **STEADY,
                                                           response_format=person_format()) for _ in range(3)]
            free = [aclient.chat.completions.create(model=MODEL_NAME, messages=free_messages, max_tokens=24,
                                                    temperature=0) for _ in range(3)]
            return await asyncio.gather(*constrained, *free)

    results = asyncio.run(together())
    for r in results[:3]:
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    for r in results[3:]:
        assert r.choices[0].message.content == alone.choices[0].message.content, "the grammar leaked into a free row"
    assert server.wait_idle()["kv_blocks_used"] == 0
