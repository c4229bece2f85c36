"""The embedder's tokenizer (`tokenizers`, from the folder's tokenizer.json): texts or token ids -> the ids the
encoder reads, cut at max_seq_length.

The folder's own truncation and padding settings are switched off (MiniLM's tokenizer.json pads and cuts at 128;
sentence-transformers cuts at max_seq_length instead). Content is encoded without special tokens, cut to
max_seq_length - (number of special tokens), then wrapped in the post-processor's special tokens ([CLS] ... [SEP]
for BERT): the first tokens are kept, as the reference's `truncation="longest_first"` keeps them for one sequence.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer

from freehold.errors import InvalidRequestError, ModelLoadError


@dataclass(frozen=True)
class Encoded:
    ids: list[int]  # special tokens included, at most max_seq_length
    num_tokens_full: int  # before truncation, special tokens included

    @property
    def truncated(self) -> bool:
        return self.num_tokens_full > len(self.ids)


class EmbedTokenizer:
    def __init__(self, path: Path, max_seq_length: int, do_lower_case: bool):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for files it cannot parse
            raise ModelLoadError(f"cannot read the tokenizer {path}: {exc}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_seq_length = max_seq_length
        self.do_lower_case = do_lower_case
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.prefix, self.suffix = self._special_tokens()
        if max_seq_length <= len(self.prefix) + len(self.suffix):
            raise ModelLoadError(f"max_seq_length {max_seq_length} leaves no room between the special tokens")

    def content_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids without special tokens, whole."""
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode(self, inputs: Sequence[str] | Sequence[Sequence[int]]) -> list[Encoded]:
        """Texts (or content token ids, checked against the vocabulary) -> the encoder's inputs."""
        if all(isinstance(x, str) for x in inputs):
            contents = self.content_ids(inputs)  # type: ignore[arg-type]
        else:
            contents = [self._checked_ids(x, i) for i, x in enumerate(inputs)]
        room = self.max_seq_length - len(self.prefix) - len(self.suffix)
        return [Encoded(self.prefix + c[:room] + self.suffix, len(c) + len(self.prefix) + len(self.suffix))
                for c in contents]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after one sequence, read off a probe."""
        probe = self._tok.encode("a", add_special_tokens=True)
        content = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        if not content:
            return list(probe.ids), []
        return list(probe.ids[:content[0]]), list(probe.ids[content[-1] + 1:])

    def _checked_ids(self, ids: object, index: int) -> list[int]:
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise InvalidRequestError(f"input[{index}] must be a string or a list of token ids, not a mix",
                                      param="input")
        out = list(ids)
        if not out:
            raise InvalidRequestError(f"input[{index}] is an empty list of token ids", param="input")
        for token in out:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise InvalidRequestError(f"input[{index}] holds {token!r}, which is not a token id of this "
                                          f"embedding model (0 to {self.vocab_size - 1})", param="input")
        return out
