"""The import rule of docs/architecture.md, checked on every `freehold` import (lazy ones included)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "freehold"

# Lowest first. A package imports only from lower layers (and itself); the one exception is named below.
LAYERS = [
    {"errors", "kernels", "sqlite_wal"},
    {"config", "tokenizer"},
    {"constrain", "layers"},
    {"types", "tools"},
    {"models", "quant"},
    {"kv", "sampling", "text_stream", "embed", "spec"},
    {"engine"},
    {"retrieval"},  # chunking, BM25 + dense + hybrid search, durable vector stores (on embed)
    {"memory"},  # stored responses and conversations (SQLite), context assembly and memories over retrieval
    {"llm", "eval"},
    {"agent"},  # the tool loop over an LLM or any OpenAI-compatible server; built-in tools
    {"server", "bench"},
    {"commands"},
    {"cli", "__init__"},
]
BOTH_WAYS = {("models", "quant"), ("quant", "models")}  # the loader packs with quant; quant reads GGUF tensors
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def top_package(module: str) -> str:
    """freehold.engine.engine -> engine; freehold.llm -> llm; freehold -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(name: str) -> bool:
    return (PACKAGE / name).is_dir() or (PACKAGE / f"{name}.py").is_file()


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "freehold":  # `from freehold import commands`
            found.update(f"freehold.{a.name}" if _is_module(a.name) else "freehold" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "freehold" or m.startswith("freehold.")}


def test_imports_flow_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        source = top_package(module)
        assert source in RANK, f"{source} has no layer in this test"
        for target in {top_package(m) for m in imports_of(path)} - {source}:
            if RANK[target] >= RANK[source] and (source, target) not in BOTH_WAYS:
                wrong.append(f"{module} imports freehold.{target}")
    assert not wrong, "\n".join(wrong)
