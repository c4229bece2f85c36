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
                                  "embed"])
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
