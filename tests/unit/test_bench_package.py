"""The benchmarks live inside the package and write their results where the user asks, never into the install."""
import json
import tomllib
from pathlib import Path

import pytest
from setuptools import find_packages

from freehold.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def test_only_freehold_is_packaged():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(ROOT), include=include)
    assert "freehold.bench" in packages
    assert all(pattern.startswith("freehold") for pattern in include)
    assert all(p == "freehold" or p.startswith("freehold.") for p in packages), packages


@pytest.mark.parametrize("name", ["generate", "throughput", "prefix", "quant", "sampling", "structured", "serve", "tools",
                                  "embed", "step", "prefill"])
def test_every_bench_takes_an_output_folder(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", name, "--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out
    assert build_parser().parse_args(["bench", name, "--out", "here"]).out == Path("here")


def test_results_go_to_the_current_directory_or_out(tmp_path, monkeypatch):
    from freehold.bench.common import DEFAULT_RESULTS_DIR, write_results
    monkeypatch.chdir(tmp_path)
    written = write_results("demo", ["a", "b"], [[1, 2.5]], None, DEFAULT_RESULTS_DIR)
    assert written == Path("bench-results") / "demo.json" and (tmp_path / written).is_file()
    assert json.loads((tmp_path / written).read_text())["rows"] == [[1, 2.5]]
    assert "| 1 | 2.5 |" in (tmp_path / "bench-results" / "demo.md").read_text()
    elsewhere = write_results("demo", ["a"], [[3]], None, tmp_path / "out")
    assert elsewhere == tmp_path / "out" / "demo.json" and elsewhere.is_file()


def _level(concurrency: int, tok_s: float, p50_ms: float, p99_ms: float):
    from freehold.bench.serve import LevelReport
    return LevelReport(concurrency, 64, 0, 10.0, int(tok_s * 10), tok_s, p50_ms, p99_ms, 20.0, 80.0, 288.0)


def test_the_serve_sweep_writes_a_png_plot(tmp_path):
    from freehold.bench.serve import plot_sweep
    reports = [_level(1, 56.0, 300, 900), _level(4, 122.0, 450, 2000), _level(16, 133.0, 590, 4700)]
    written = plot_sweep(reports, tmp_path / "sub" / "serve.png", title="demo")
    assert written == tmp_path / "sub" / "serve.png"
    data = written.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000


def test_the_sweep_sets_levels_workload_and_plot_and_concurrency_still_works(tmp_path):
    from freehold.bench.serve import SWEEP, _workload_shape, plot_path
    args = build_parser().parse_args(["bench", "serve", "--sweep", "1,4,16,64", "--num-requests", "3",
                                      "--out", str(tmp_path)])
    assert _workload_shape(args) == ([1, 4, 16, 64], SWEEP["num_requests"], (64, 512), (64, 256))
    assert SWEEP["num_requests"] == 64 and plot_path(args) == tmp_path / "serve.png"
    args = build_parser().parse_args(["bench", "serve", "--concurrency", "2,8", "--num-requests", "5",
                                      "--input-len", "10,20", "--output-len", "3,4", "--max-num-batched-tokens", "256"])
    assert _workload_shape(args) == ([2, 8], 5, (10, 20), (3, 4)) and plot_path(args) is None
    assert args.max_num_batched_tokens == "256"
    assert build_parser().parse_args(["bench", "serve", "--plot", "x.png"]).plot == Path("x.png")
    with pytest.raises(SystemExit, match="once"):
        _workload_shape(build_parser().parse_args(["bench", "serve", "--sweep", "1,4", "--concurrency", "2"]))


def test_the_serve_table_goes_through_write_results(tmp_path):
    from freehold.bench.common import write_results
    from freehold.bench.serve import TABLE_HEADERS, table_rows
    write_path = write_results("serve", TABLE_HEADERS, table_rows([_level(1, 56.0, 300, 900)]), None, tmp_path)
    written = json.loads(write_path.read_text())
    assert written["headers"][4] == "output tok/s" and written["rows"][0][:5] == [1, 64, 0, 10.0, 56.0]
    assert written["rows"][0][5:] == [300, 900, 20.0, 80.0]


def test_a_missing_matplotlib_is_named_before_the_server_starts(monkeypatch, capsys, tmp_path):
    import sys

    from freehold.bench import serve
    from freehold.cli import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as when it is not installed

    def start_server(args):
        raise AssertionError("the server started before the missing package was reported")
    monkeypatch.setattr(serve, "_start_server", start_server)
    assert main(["bench", "serve", "--sweep", "1,4", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install 'freehold[inspect]'" in err


def test_the_started_server_gets_the_kv_dtype(monkeypatch):
    import argparse

    import pytest

    from freehold.bench import serve
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    commands = []

    class Started(Exception):
        pass

    def popen(cmd):
        commands.append(cmd)
        raise Started
    monkeypatch.setattr(serve.subprocess, "Popen", popen)
    with pytest.raises(Started):
        serve._start_server(parser.parse_args(["--kv-dtype", "bf16", "--max-num-seqs", "8"]))
    assert " --kv-dtype bf16" in " ".join(commands[0]) and " --max-num-seqs 8" in " ".join(commands[0])
    with pytest.raises(Started):
        serve._start_server(parser.parse_args([]))
    assert "--kv-dtype" not in commands[1]


def test_a_llama_cpp_that_does_not_import_is_named(monkeypatch):
    """llama-cpp-python installed without a dependency (it imports diskcache): a message, not a traceback."""
    import sys
    from freehold.bench.generate import llama_cpp_model
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with pytest.raises(SystemExit, match="llama-cpp-python is installed but does not import"):
        llama_cpp_model(Path("model.gguf"), 64)


def test_bench_serve_takes_a_url_with_or_without_v1_and_names_an_unusable_server_in_one_line():
    import asyncio

    import httpx

    from freehold.bench.serve import _served_model, server_root
    assert server_root("http://h:8/v1") == server_root("http://h:8/v1/") == server_root("http://h:8") == "http://h:8"

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/models":
            return httpx.Response(404, json={"error": {"message": "File Not Found"}})
        if request.url.host == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.host == "locked":
            return httpx.Response(401 if request.headers.get("authorization") != "Bearer k" else 200,
                                  json={"data": [{"id": "m"}]})
        return httpx.Response(200, json={"data": [{"id": "m"}]} if request.url.host == "good" else {"models": []})

    async def served(root: str, key: str | None = None) -> str:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        async with httpx.AsyncClient(base_url=root, headers=headers, transport=httpx.MockTransport(answer)) as client:
            return await _served_model(client, root)
    assert asyncio.run(served("http://good")) == "m"
    with pytest.raises(SystemExit, match=r"http://bad/v1/models \(HTTP 200\) lists no model id.*--served-model-name"):
        asyncio.run(served("http://bad"))
    with pytest.raises(SystemExit, match=r"cannot reach http://down: ConnectError: connection refused"):
        asyncio.run(served("http://down"))
    with pytest.raises(SystemExit, match=r"http://locked/v1/models answered HTTP 401: the server wants a key "
                                         r"\(--api-key\)$"):
        asyncio.run(served("http://locked"))
    with pytest.raises(SystemExit, match=r"HTTP 401: the server wants a key \(--api-key\), and refused this one$"):
        asyncio.run(served("http://locked", "wrong"))
    assert asyncio.run(served("http://locked", "k")) == "m"
