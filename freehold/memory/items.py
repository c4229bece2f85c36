"""Message items in the shape the Responses API stores them: what `freehold chat --session` writes and reads, and what
the server stores for a plain-text input message.

    {"type": "message", "id": "msg_...", "role": "user", "status": "completed",
     "content": [{"type": "input_text", "text": "..."}]}      (an assistant's parts are output_text)
"""
from __future__ import annotations

import secrets
from typing import Any

TEXT_PARTS = ("input_text", "output_text")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def message_item(role: str, text: str, item_id: str | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "output_text", "text": text, "annotations": []} if role == "assistant" \
        else {"type": "input_text", "text": text}
    return {"type": "message", "id": item_id or new_id("msg"), "role": role, "status": "completed",
            "content": [part]}


def message_text(item: dict[str, Any]) -> str | None:
    """The text of a message item (its text parts joined); None for any other item."""
    if item.get("type", "message") != "message":
        return None
    content = item.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content or [] if part.get("type") in TEXT_PARTS)
