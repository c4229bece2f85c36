"""`ChatSession`: a named conversation that `freehold chat --session NAME` resumes across runs, in the same store as the
server's conversations (DATA_DIR/conversations.sqlite): the conversation whose metadata holds
{"freehold_session": NAME}. Each exchange commits as one turn (the user's message and the reply together), so a
run killed mid-reply leaves the session as it was after the last full exchange.
"""
from __future__ import annotations

from pathlib import Path

from freehold.errors import InvalidRequestError
from freehold.memory.items import message_item, message_text
from freehold.memory.store import FILENAME, ConversationStore, Turn

SESSION_KEY = "freehold_session"


class ChatSession:
    def __init__(self, store: ConversationStore, conversation_id: str):
        self.store = store
        self.conversation_id = conversation_id

    @classmethod
    def open(cls, data_dir: str | Path, name: str) -> ChatSession:
        """The session `name` in `data_dir`, created if new (found or created in one transaction). A data_dir of
        "none" (the server's and CLI's word for no storage) is an InvalidRequestError: a session needs storage."""
        if str(data_dir).strip().lower() in ("", "none"):
            raise InvalidRequestError(f"--session {name!r} needs a data directory to keep the conversation in: "
                                      "give --data-dir a folder, not 'none'", param="data_dir")
        store = ConversationStore(Path(data_dir) / FILENAME)
        return cls(store, store.find_or_create_conversation(SESSION_KEY, name).id)

    def messages(self) -> list[dict[str, str]]:
        """The session's message items as chat messages, oldest first (other items are skipped)."""
        out = []
        for item in self.store.items(self.conversation_id):
            text = message_text(item)
            if text is not None:
                out.append({"role": "system" if item["role"] == "developer" else item["role"], "content": text})
        return out

    def add_turn(self, user: str, reply: str) -> None:
        self.store.commit_turn(Turn([message_item("user", user)], [message_item("assistant", reply)],
                                    conversation_id=self.conversation_id))
