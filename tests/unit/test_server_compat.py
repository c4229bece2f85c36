"""Unknown request fields (freehold.server.compat): found at any depth, removed, listed; refused under --strict-api."""
from __future__ import annotations

import pytest

from freehold.errors import InvalidRequestError
from freehold.server.compat import IGNORED_FIELDS_HEADER, ignored_fields_headers, pop_unknown_fields
from freehold.server.protocol import ChatCompletionRequest


def _request(**extra) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi", "cache_control": {"type": "ephemeral"}}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "x": 1}}],
            **extra}
    return ChatCompletionRequest.model_validate(body)


def test_unknown_fields_are_found_at_every_depth_and_removed() -> None:
    request = _request(vendor_flag=True, metadata={"a": "b"})
    assert pop_unknown_fields(request, strict=False) == ["vendor_flag", "messages[0].cache_control",
                                                         "tools[0].function.x"]
    assert "vendor_flag" not in request.model_dump() and "x" not in request.tools[0].function.model_dump()
    assert pop_unknown_fields(request, strict=False) == []  # nothing left to find


def test_strict_mode_refuses_the_first_unknown_field_by_name() -> None:
    with pytest.raises(InvalidRequestError) as err:
        pop_unknown_fields(_request(), strict=True)
    assert err.value.param == "messages[0].cache_control"


def test_declared_fields_are_not_unknown() -> None:
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi", "name": "alice"}], "service_tier": "auto", "store": True,
         "user": "u", "metadata": {"k": "v"}, "reasoning_effort": "low", "chat_template_kwargs": {"a": 1},
         "add_generation_prompt": False, "continue_final_message": True, "prediction": {"type": "content"}})
    assert pop_unknown_fields(request, strict=True) == []


def test_the_header_is_bounded_and_ascii() -> None:
    assert ignored_fields_headers([]) == {}
    many = ignored_fields_headers([f"f{i}" for i in range(40)] + ["é"])[IGNORED_FIELDS_HEADER]
    assert many.endswith("... 9 more") and many.isascii()
    assert ignored_fields_headers(["é"])[IGNORED_FIELDS_HEADER] == "\\xe9"


def test_the_header_holds_no_control_characters_and_no_long_names() -> None:
    """A field name is the client's own text: CR/LF in a header value makes h11 drop the whole response."""
    value = ignored_fields_headers(["a\r\nSet-Cookie: x=1", "y" * 100_000])[IGNORED_FIELDS_HEADER]
    assert value.startswith("a\\r\\nSet-Cookie: x=1, yyy") and value.isprintable() and len(value) < 200


def test_template_options_carry_vllms_controls_and_reasoning_effort() -> None:
    from freehold.server.params import template_options
    request = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "low", "continue_final_message": True,
         "chat_template_kwargs": {"enable_thinking": False}})
    options = template_options(request)
    assert options.variables == {"enable_thinking": False, "reasoning_effort": "low"}
    assert options.continue_final_message and not options.add_generation_prompt  # continuing implies no new turn
    plain = template_options(ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]}))
    assert plain.add_generation_prompt and not plain.continue_final_message and plain.variables == {}
