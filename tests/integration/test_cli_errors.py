"""Bad input to the CLI: one clear message naming the problem, exit code 2, no traceback.

Files that are not GGUF models run `python -m freehold.cli` in a subprocess (the command as a user starts it, and
a bad file cannot take the test process down); the other cases call freehold.cli.main in this process, where an
exception that escapes main fails the test as a traceback would, without a Python start and model load each."""
import subprocess
import sys

import numpy as np
import pytest


def freehold(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "freehold.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def freehold_here(capsys):
    """freehold(...) in this process: (exit code, stderr) as a CompletedProcess."""
    from freehold.cli import main

    def run(*args):
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


def assert_clear_error(run, *needles):
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("freehold: error: ")
    for needle in needles:
        assert needle in last, last


def write_gguf(path, arch):
    import gguf
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_missing_file(freehold_here):
    assert_clear_error(freehold_here("generate", "hi", "--model", "/nonexistent/model.gguf"), "does not exist")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model")
    assert_clear_error(freehold("generate", "hi", "--model", str(bad)), "not a GGUF file")


def test_truncated_gguf(tmp_path, default_model_file):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_file.read_bytes()[:5_000_000])
    assert_clear_error(freehold("generate", "hi", "--model", str(cut)), "cut.gguf")


def test_unsupported_architecture(tmp_path, freehold_here):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2")
    assert_clear_error(freehold_here("generate", "hi", "--model", str(path)), "unsupported model architecture",
                       "gpt2")


def test_prompt_longer_than_context(freehold_here, auto_llm, monkeypatch):
    """On the session's default LLM (tests/conftest.py) instead of a load: its KV budget (256 MiB, bf16: over 11K
    tokens) leaves the model's 8192-token context as the limit, as --kv-cache-memory 1G does."""
    from freehold import commands
    monkeypatch.setattr(commands, "load_llm", lambda args, **options: auto_llm)
    assert auto_llm.engine.max_model_len == 8192
    long_prompt = "word " * 9000
    assert_clear_error(freehold_here("generate", long_prompt, "--kv-cache-memory", "1G"), "prompt has", "8192")
    assert not auto_llm.engine.has_unfinished()
