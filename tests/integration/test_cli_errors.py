"""Bad input to the CLI: one clear message naming the problem, exit code 2, no traceback."""
import subprocess
import sys

import numpy as np


def freehold(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "freehold.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


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


def test_missing_file():
    assert_clear_error(freehold("generate", "hi", "--model", "/nonexistent/model.gguf"), "does not exist")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("this is not a model")
    assert_clear_error(freehold("generate", "hi", "--model", str(bad)), "not a GGUF file")


def test_truncated_gguf(tmp_path, default_model_file):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_file.read_bytes()[:5_000_000])
    assert_clear_error(freehold("generate", "hi", "--model", str(cut)), "cut.gguf")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, "gpt2")
    assert_clear_error(freehold("generate", "hi", "--model", str(path)), "unsupported model architecture", "gpt2")


def test_prompt_longer_than_context():
    long_prompt = "word " * 9000
    assert_clear_error(freehold("generate", long_prompt, "--kv-cache-memory", "1G"), "prompt has", "8192")
