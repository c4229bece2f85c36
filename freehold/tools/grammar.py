"""ToolRequest -> the constraint that makes every call well-formed: an xgrammar structural tag over the fixed call
syntax (freehold.tools.parse). Each offered tool is one tag,

    begin   <tool_call>{"name": "NAME", "arguments":     (the name is fixed text: only offered names exist)
    content the tool's parameter schema as JSON           (at most one whitespace character in a row)
    end     }</tool_call>

    auto       any text; once "<tool_call>" is written the call is constrained to its end (triggered tags), then
               text again (parallel) or only the end of the output (parallel_tool_calls false)
    required   calls from the first token, separated by "\\n", at least one (exactly one if not parallel)
    function   exactly one call, of that function
    none       no constraint (the tools are not in the prompt either)

After the last call of required/function only the stop token can follow: the grammar is complete there, so the
stop guard in freehold.constrain.matcher lets it through. No string in the arguments may contain "</tool_call>",
which would end the block early for the parser.
"""
from __future__ import annotations

import json
from typing import Any

from freehold.constrain.spec import StructuralTag
from freehold.tools.parse import CLOSE, OPEN, call_head
from freehold.tools.spec import ToolChoiceMode, ToolRequest, ToolSpec

SEPARATOR = "\n"  # between parallel calls in required mode


def tool_constraint(request: ToolRequest | None) -> StructuralTag | None:
    """The constraint spec for `request` (compile it with ConstraintCompiler.compile), or None for no constraint."""
    if request is None or request.mode is ToolChoiceMode.NONE:
        return None
    tags = [_tag(tool) for tool in request.callable_tools]
    one = request.max_calls == 1
    if request.mode is ToolChoiceMode.AUTO:
        fmt = {"type": "triggered_tags", "triggers": [OPEN], "tags": tags, "stop_after_first": one}
    else:
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": SEPARATOR, "at_least_one": True,
               "stop_after_first": one}
    text = json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False, separators=(",", ":"))
    return StructuralTag(text, what="tool calls")


def _tag(tool: ToolSpec) -> dict[str, Any]:
    return {"type": "tag", "begin": call_head(tool.name), "end": "}" + CLOSE,
            "content": {"type": "json_schema", "json_schema": tool.parameters.schema, "max_whitespace_cnt": 1,
                        "excludes": [CLOSE]}}
