"""Generated ids -> text deltas, with stop strings matched across token boundaries.

A stop string may straddle tokens, so the last (longest stop - 1) characters are held back until more text
proves they do not start a stop string. On a match the text is cut before the stop string and `stopped` is set;
the caller then ends the request with finish_reason "stop". `fold_output` is that rule for one engine output,
shared by the Python API (llm.py) and the server (server/serving.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

from freehold.tokenizer import IncrementalDetokenizer, Tokenizer
from freehold.types import CompletionOutput, FinishReason


@dataclass(frozen=True)
class TextDelta:
    text: str
    stopped: bool  # a stop string matched; no text follows


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""  # decoded, not yet emitted
        self._stopped = False

    def push(self, token_ids: Sequence[int]) -> TextDelta:
        if self._stopped:
            return TextDelta("", True)
        self._pending += self._detok.push(token_ids)
        return self._release(final=False)

    def finish(self) -> TextDelta:
        """Flush what was held back at the end of generation."""
        if self._stopped:
            return TextDelta("", True)
        self._pending += self._detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> TextDelta:
        cut = self._first_stop()
        if cut is not None:
            text, self._pending, self._stopped = self._pending[:cut], "", True
            return TextDelta(text, True)
        keep = 0 if final else min(self._hold, len(self._pending))
        text = self._pending[:len(self._pending) - keep]
        self._pending = self._pending[len(text):]
        return TextDelta(text, False)

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None


class FoldedOutput(NamedTuple):
    text: str  # new text of the completion
    finish_reason: FinishReason | None  # None: the completion goes on
    stopped_early: bool  # a stop string ended it before the engine did: the caller must stop the engine's sequence


def fold_output(stream: TextStream, out: CompletionOutput) -> FoldedOutput:
    """Fold one step's tokens of one completion into its TextStream. A stop string matched anywhere, including in
    the text flushed when the engine finishes, makes the finish reason "stop"."""
    pushed = stream.push(out.token_ids)
    if pushed.stopped:
        return FoldedOutput(pushed.text, FinishReason.STOP, stopped_early=not out.finished)
    if not out.finished:
        return FoldedOutput(pushed.text, None, stopped_early=False)
    tail = stream.finish()
    return FoldedOutput(pushed.text + tail.text, FinishReason.STOP if tail.stopped else out.finish_reason, False)
