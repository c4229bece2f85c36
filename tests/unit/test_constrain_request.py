"""Request fields -> the one constraint spec a request asks for (OpenAI response_format, vLLM guided_* and
structured_outputs), and the field named when it is wrong."""
import pytest

from freehold.constrain.spec import Choice, Grammar, JsonObject, JsonSchema, Regex
from freehold.errors import InvalidRequestError
from freehold.server.protocol import ChatCompletionRequest, CompletionRequest
from freehold.server.structured import requested_constraint

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                 **fields})


@pytest.mark.parametrize("fields,spec,param", [
    ({"response_format": {"type": "json_object"}}, JsonObject(), "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
     JsonSchema.from_value(SCHEMA), "response_format.json_schema.schema"),
    ({"guided_json": SCHEMA}, JsonSchema.from_value(SCHEMA), "guided_json"),
    ({"guided_json": '{"type": "object", "properties": {"a": {"type": "integer"}}}'}, JsonSchema.from_value(SCHEMA),
     "guided_json"),
    ({"guided_regex": "[0-9]+"}, Regex("[0-9]+"), "guided_regex"),
    ({"guided_grammar": 'root ::= "a"'}, Grammar('root ::= "a"'), "guided_grammar"),
    ({"guided_choice": ["x", "y"]}, Choice(("x", "y")), "guided_choice"),
    ({"structured_outputs": {"json": SCHEMA}}, JsonSchema.from_value(SCHEMA), "structured_outputs.json"),
    ({"structured_outputs": {"choice": ["x"]}}, Choice(("x",)), "structured_outputs.choice"),
    ({"structured_outputs": {"json_object": True}}, JsonObject(), "structured_outputs.json_object"),
])
def test_each_field_maps_to_its_spec(fields, spec, param):
    requested = requested_constraint(chat(**fields))
    assert requested is not None and requested.spec == spec and requested.param == param


def test_text_format_and_no_field_ask_for_nothing():
    assert requested_constraint(chat()) is None
    assert requested_constraint(chat(response_format={"type": "text"})) is None
    prompt = CompletionRequest.model_validate({"model": "m", "prompt": "x", "guided_regex": "a"})
    assert requested_constraint(prompt).spec == Regex("a")


@pytest.mark.parametrize("fields,param,words", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "at most one"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs a 'json_schema'"),
    ({"response_format": {"type": "text", "json_schema": {"name": "a", "schema": {}}}},
     "response_format.json_schema", "only allowed"),
    ({"guided_choice": []}, "guided_choice", "empty"),
    ({"guided_json": "[1, 2]"}, "guided_json", "must be an object"),
    ({"structured_outputs": {"regex": "a\ud800"}}, "structured_outputs.regex", "surrogate"),
    ({"structured_outputs": {}}, "structured_outputs", "must set one"),
])
def test_bad_requests_name_the_field(fields, param, words):
    with pytest.raises(InvalidRequestError) as info:
        requested_constraint(chat(**fields))
    assert info.value.param == param and words in str(info.value)
