"""Documents from disk for `freehold index build` and `freehold eval retrieval`.

A BEIR corpus.jsonl (one {"_id", "title", "text"} per line; a document is its title + " " + text, as BEIR's
dense and BM25 baselines read it) or a folder of .txt / .md files (the file id is the path inside the folder).
"""
from __future__ import annotations

import json
from pathlib import Path

from freehold.errors import InvalidRequestError
from freehold.retrieval.records import FileInput

TEXT_SUFFIXES = (".txt", ".md")


def read_corpus(path: Path) -> list[FileInput]:
    if path.is_dir():
        return read_folder(path)
    if path.is_file() and path.suffix == ".jsonl":
        return read_beir_jsonl(path)
    raise InvalidRequestError(f"--data must be a BEIR corpus.jsonl or a folder of .txt/.md files: {path}",
                              param="data")


def read_beir_jsonl(path: Path) -> list[FileInput]:
    files = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                text = f"{doc.get('title') or ''} {doc['text']}".strip()
                files.append(FileInput(str(doc["_id"]), str(doc["_id"]), text))
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InvalidRequestError(f"{path}:{number}: not a BEIR document with _id and text ({exc})",
                                          param="data") from None
    return files


def read_folder(folder: Path) -> list[FileInput]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not paths:
        raise InvalidRequestError(f"no .txt or .md files under {folder}", param="data")
    files = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"{p} is not UTF-8 text", param="data") from None
        name = str(p.relative_to(folder))
        files.append(FileInput(name, name, text))
    return files
