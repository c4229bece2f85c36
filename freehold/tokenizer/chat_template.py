"""Render a model's Jinja chat template in a sandbox, with the helpers transformers gives templates."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from freehold.errors import InvalidRequestError, ModelLoadError

# Used when a model has no template of its own (as llama.cpp does).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# the variables a render sets itself; `TemplateOptions.variables` may not replace them
RESERVED_VARIABLES = frozenset({"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token",
                                "unk_token", "pad_token", "raise_exception", "strftime_now", "tojson"})


@dataclass(frozen=True)
class TemplateOptions:
    """How to render a conversation (transformers' and vLLM's names).

    add_generation_prompt: end with the header of a new assistant turn, so the model writes the reply.
    continue_final_message: end inside the last message instead (no end-of-turn after it), so the model continues
        it: a prefill. Exclusive with add_generation_prompt.
    variables: extra template variables (vLLM's chat_template_kwargs, e.g. {"enable_thinking": false}).
    """

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    variables: Mapping[str, Any] = field(default_factory=dict)


class ChatTemplate:
    """A compiled chat template. `render` turns OpenAI-style messages into the prompt text."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]):
        self.source = source
        self._special_tokens = dict(special_tokens)  # bos_token, eos_token, ... as template variables
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ModelLoadError(f"the model's chat template does not compile: {e}") from e

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, options: TemplateOptions | None = None) -> str:
        """The prompt text. Raises InvalidRequestError when the template rejects the messages. `options`, when
        given, replaces `add_generation_prompt` and adds continue_final_message and extra variables."""
        options = options or TemplateOptions(add_generation_prompt=add_generation_prompt)
        _check_options(options)
        plain = [_plain_message(m) for m in messages]
        variables = {**options.variables, **self._special_tokens, "messages": plain, "tools": tools,
                     "documents": None, "add_generation_prompt": options.add_generation_prompt}
        try:
            text = self._template.render(**variables)
        except jinja2.TemplateError as e:  # includes SecurityError and raise_exception(...)
            raise _render_error(str(e)) from e
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise _render_error(f"{type(e).__name__}: {e}") from e
        return _cut_after_final_message(text, plain) if options.continue_final_message else text


def _check_options(options: TemplateOptions) -> None:
    if options.add_generation_prompt and options.continue_final_message:
        raise InvalidRequestError("add_generation_prompt and continue_final_message cannot both be true: set "
                                  "add_generation_prompt to false to continue the last message",
                                  param="continue_final_message")
    for name in options.variables:
        if name in RESERVED_VARIABLES:
            raise InvalidRequestError(f"chat_template_kwargs cannot set {name!r}: the request sets it",
                                      param=f"chat_template_kwargs.{name}")


def _cut_after_final_message(text: str, messages: list[dict[str, Any]]) -> str:
    """The render up to the end of the last message's content, as transformers does for continue_final_message:
    whatever the template writes after it (end-of-turn tokens) goes, so generation continues the message.
    Trailing whitespace of the content is not kept either, since templates often strip it."""
    content = messages[-1].get("content") if messages else None
    if not isinstance(content, str) or not content.strip():
        raise InvalidRequestError("continue_final_message needs a last message with text to continue",
                                  param="continue_final_message")
    end = text.rfind(content.strip())
    if end < 0:
        raise InvalidRequestError("continue_final_message: the chat template does not write the last message's "
                                  "text verbatim, so it cannot be continued", param="continue_final_message")
    return text[:end + len(content.strip())]


def _render_error(reason: str) -> InvalidRequestError:
    return InvalidRequestError(f"the model's chat template failed on these messages: {reason}", param="messages")


def _plain_message(message: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the message whose `content`, if a list of text parts, is joined into one string."""
    if not isinstance(message, Mapping):
        raise InvalidRequestError(f"each chat message must be an object, got {type(message).__name__}",
                                  param="messages")
    plain = dict(message)
    if isinstance(plain.get("content"), list):
        plain["content"] = _join_text_parts(plain["content"])
    return plain


def _join_text_parts(parts: list[Any]) -> str:
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise InvalidRequestError(f"only text content parts are supported, got a part of type {kind!r}",
                                      param="messages")
        texts.append(part["text"])
    return "\n".join(texts)


class _GenerationBlock(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` marker and render its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (no reaching CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the namespace attribute {name!r}")


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """Like transformers' `tojson`: no HTML escaping, unicode kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _TemplateNamespace
    env.globals["dict"] = _TemplateDict()
    return env
