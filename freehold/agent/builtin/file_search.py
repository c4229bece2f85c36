"""The `file_search` tool: search one or more vector stores (freehold.retrieval) and return the best chunks as text,
"[1] filename (score 0.83)" followed by the chunk, best first across the stores."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from freehold.agent.functions import FunctionTool, function_tool

if TYPE_CHECKING:  # freehold.retrieval needs the `retrieval` extra: the other built-in tools must not
    from freehold.retrieval.manager import StoreManager
    from freehold.retrieval.records import SearchHit

MAX_TOTAL_CHARS = 12000  # all chunks together; the last one shown is cut to fit


def file_search_tool(manager: StoreManager, vector_store_ids: Sequence[str], max_num_results: int = 5,
                     max_total_chars: int = MAX_TOTAL_CHARS) -> FunctionTool:
    """The tool over `vector_store_ids` (each must exist: StoreNotFoundError otherwise)."""
    store_ids = list(vector_store_ids)
    if not store_ids:
        raise ValueError("file_search needs at least one vector store id")
    if max_num_results < 1:
        raise ValueError(f"file_search: max_num_results must be at least 1, got {max_num_results}")
    for store_id in store_ids:
        manager.get(store_id)  # an unknown id fails now, not at the model's first search

    def file_search(query: str) -> str:
        """Search the uploaded documents for passages relevant to a query; returns the best matching passages with their file names.

        Args:
            query: what to look for, in words.
        """
        if not query.strip():
            raise ValueError("the query is empty")
        hits = [hit for store_id in store_ids
                for hit in manager.search(store_id, query, max_num_results=max_num_results).hits]
        hits.sort(key=lambda hit: -hit.score)  # stable: ties keep the order of the stores given
        return format_hits(hits[:max_num_results], max_total_chars) or f"no results for {query!r}"
    return function_tool(file_search)


def format_hits(hits: list[SearchHit], max_total_chars: int) -> str:
    blocks: list[str] = []
    room = max_total_chars
    for n, hit in enumerate(hits, 1):
        block = f"[{n}] {hit.filename} (score {hit.score:.2f})\n{hit.text.strip()}"
        if len(block) > room:
            if room > 100:  # worth showing part of it
                blocks.append(block[:room] + " [...]")
            break
        blocks.append(block)
        room -= len(block) + 2
    return "\n\n".join(blocks)


class StoreFolder:
    """One store opened from its folder (`freehold index build --out DIR`) in the shape file_search_tool asks of a
    StoreManager: its only id is "store"."""

    ID = "store"

    def __init__(self, store: object):
        self._store = store

    def get(self, store_id: str) -> None:
        if store_id != self.ID:
            raise ValueError(f"this folder holds one store, {self.ID!r}, not {store_id!r}")

    def search(self, store_id: str, query: str, max_num_results: int = 5):  # -> SearchResult
        self.get(store_id)
        return self._store.search(query, max_num_results=max_num_results)  # type: ignore[attr-defined]
