"""Fixtures that start the real server (`python -m freehold.server.main`) as a subprocess on a free port.

`server` is shared by the whole session (one model load); `keyed_server` is a second, tiny one with an API key,
one sequence at a time, a waiting limit of one and --strict-api, for the auth, overload and strict-API tests.
"""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest

MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY = "test-key-123"
STARTUP_TIMEOUT_S = 180


@dataclass
class ServerProcess:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def engine_state(self) -> dict:
        return httpx.get(f"{self.url}/debug/engine", headers=self.headers(), timeout=10).json()

    def wait_idle(self, timeout_s: float = 10.0) -> dict:
        """Poll the engine until nothing runs, waits or holds KV; returns the last state."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.engine_state()
            idle = (state["num_running"] == 0 and state["num_waiting"] == 0 and state["kv_blocks_used"] == 0
                    and state["num_pending"] == 0)
            if idle or time.monotonic() > deadline:
                return state
            time.sleep(0.1)


def chat_400(server: ServerProcess, messages: list[dict], body: dict) -> dict:
    """POST a chat request (max_tokens 8, plus `body`) that must be refused: asserts a 400, returns its error."""
    r = httpx.post(f"{server.base_url}/chat/completions", timeout=60,
                   json={"model": MODEL_NAME, "messages": messages, "max_tokens": 8, **body})
    assert r.status_code == 400, r.text
    return r.json()["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args: str, api_key: str | None = None, open_files_soft_limit: int | None = None) -> ServerProcess:
    """`open_files_soft_limit` starts the process with that soft RLIMIT_NOFILE (the hard limit unchanged)."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="freehold-server-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "freehold.server.main", "--port", str(port), *args]
    if "--data-dir" not in args:  # never the user's own data directory
        cmd += ["--data-dir", tempfile.mkdtemp(prefix="freehold-data-")]
    env = {k: v for k, v in os.environ.items() if k != "FREEHOLD_API_KEY"}
    if api_key:
        cmd += ["--api-key", api_key]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=_soft_open_files(open_files_soft_limit))
    server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path, api_key)
    _wait_healthy(server)
    return server


def _soft_open_files(limit: int | None):
    if limit is None:
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def stop_server(server: ServerProcess) -> None:
    server.process.terminate()  # requests still running get the shutdown grace period (default 20 s), then a 503
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=5)
    server.log_path.unlink(missing_ok=True)


def _wait_healthy(server: ServerProcess) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    server.process.kill()
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    # fp32 weights and KV cache: the configuration whose greedy output does not depend on the batch
    # (docs/architecture.md); the default weights and bf16 cache have their own tests (test_default_weights.py)
    s = start_server("--kv-cache-memory", "256M", "--max-model-len", "2048", "--max-num-seqs", "32",
                     "--weights", "fp32", "--kv-dtype", "fp32")
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def keyed_server() -> Iterator[ServerProcess]:
    # --window 512: requests may ask for "kv_policy": "sink" (tests/integration/test_server_sink.py)
    s = start_server("--kv-cache-memory", "64M", "--max-model-len", "1024", "--max-num-seqs", "1",
                     "--max-waiting", "1", "--strict-api", "--window", "512", api_key=API_KEY)
    yield s
    stop_server(s)


@pytest.fixture(scope="session")
def reference(default_model_file):
    """transformers' model and tokenizer on the default model's GGUF weights, fp32: the reference for numbers
    (loaded once: the parity and perplexity tests share it)."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = default_model_file
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok
