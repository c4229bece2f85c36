"""Durable conversation state: stored responses and conversations in SQLite (`store.ConversationStore`), shared by
the server (/v1/responses with `store`, `previous_response_id`, `conversation`; /v1/conversations) and
`freehold chat --session`. Items are OpenAI Responses API items, kept as JSON: this package does not interpret them
beyond the text of message items (`items`). Context assembly under a token budget (`context`, pure), recall over a
conversation's own history (`recall`, BM25 from freehold.retrieval) and explicit memories with each conversation's
context state (`memories`, same SQLite file) decide what of that state enters a turn's prompt."""
