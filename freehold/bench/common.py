"""Shared benchmark plumbing: tables, result files, workloads from the pydoc text."""
from __future__ import annotations

import json
import platform
import random
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path

import torch

DEFAULT_RESULTS_DIR = Path("bench-results")  # relative: under the current directory, never the install


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[h for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_results(name: str, headers: list[str], rows: list[list], extra: dict | None = None,
                  out: Path = DEFAULT_RESULTS_DIR) -> Path:
    """Print the table and write out/<name>.json (+ .md with the same table); returns the JSON's path."""
    table = format_table(headers, rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    record = {"benchmark": name, "meta": meta, "headers": headers, "rows": rows, "extra": _plain(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
    print(f"\nwrote {out / (name + '.json')}")
    return out / f"{name}.json"


def _plain(x):
    if is_dataclass(x):
        return asdict(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    return x


def pydoc_token_ids(tokenizer) -> list[int]:
    from freehold.eval.ppl import default_text
    return tokenizer.encode(default_text()[:400_000], add_special_tokens=False)


def random_workload(corpus: list[int], num: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                    seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) pairs: prompts are random slices of real text."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = rng.randint(*prompt_range)
        start = rng.randrange(0, len(corpus) - n)
        out.append((corpus[start:start + n], rng.randint(*output_range)))
    return out


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
