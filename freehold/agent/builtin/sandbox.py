"""The `python` tool: run a model's Python code in a fresh, limited child process and return what it printed.

Each call gets a new temporary working directory (removed afterwards) and a new `python -I` process in its own
session, with a minimal environment (no inherited secrets), rlimits on CPU time, memory, file size and open files,
and an audit hook (sandbox_child.py) that refuses writes outside the working directory, other processes' /proc
entries, new processes, network and ctypes. A wall-clock timeout kills the whole process group. This is a guard against mistakes and casual misuse, not a
container: docs/agent-tools.md says what it does not isolate.

Whatever the code does is returned as text, the model's feedback: its output, plus a first line saying how it ended
when that was not a clean exit ("exit code 1", "killed by SIGXCPU ...", "timed out after 10 s ..."). Only a failure
of the sandbox itself (Python cannot start) or bad input (code too long) raises.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from freehold.agent.functions import FunctionTool, function_tool

CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_CUT_MARK = "\n... [{} characters cut] ...\n"


@dataclass(frozen=True)
class PythonSandbox:
    timeout_s: float = 10.0  # wall clock of one run
    cpu_seconds: int = 5
    memory_bytes: int = 512 * 2**20  # address space (RLIMIT_AS)
    max_output_chars: int = 8000  # stdout and stderr together; the middle is cut, the start and the end kept
    max_file_bytes: int = 16 * 2**20  # largest file the code may write
    max_open_files: int = 64
    max_code_chars: int = 100_000

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"PythonSandbox.timeout_s must be positive, got {self.timeout_s}")
        for name in ("cpu_seconds", "memory_bytes", "max_output_chars", "max_file_bytes", "max_open_files",
                     "max_code_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PythonSandbox.{name} must be a positive integer, got {value!r}")
        if self.max_open_files < 16:  # the interpreter itself needs a few (imports, pipes)
            raise ValueError(f"PythonSandbox.max_open_files must be at least 16, got {self.max_open_files}")

    def run(self, code: str) -> str:
        """Run Python 3 code in a fresh sandboxed process and return its output (stdout and stderr, with the traceback if it fails). Print what you want to see (the value of a final expression is shown too). Nothing persists between calls.

        Args:
            code: a complete Python 3 program, e.g. "import math\\nprint(math.factorial(20))".
        """
        if not isinstance(code, str):
            raise TypeError(f"code must be a string, got {type(code).__name__}")
        if len(code) > self.max_code_chars:
            raise ValueError(f"the code has {len(code)} characters; the limit is {self.max_code_chars}")
        workdir = tempfile.mkdtemp(prefix="freehold-python-")
        try:
            Path(workdir, "main.py").write_text(code, encoding="utf-8")
            return self._execute(workdir)
        finally:
            _remove_tree(workdir)

    def description(self) -> str:
        return (f"Run Python 3 code in a fresh sandboxed process and return its output (stdout and stderr, with the "
                f"traceback if it fails). Print what you want to see; the value of a final expression is shown too. "
                f"Each call starts from scratch: no variables or files persist. No network, no new processes; files "
                f"can be written only in the current directory. Limits: {self.timeout_s:g} s, "
                f"{self.memory_bytes // 2**20} MB of memory, {self.max_output_chars} characters of output.")

    def _execute(self, workdir: str) -> str:
        limits = {k: v for k, v in asdict(self).items() if k in ("cpu_seconds", "memory_bytes", "max_file_bytes",
                                                                 "max_open_files")}
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-u", "-X", "utf8", CHILD, workdir, json.dumps(limits)],
                                    cwd=workdir, env=_environment(workdir), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise RuntimeError(f"the python sandbox could not start {sys.executable}: {exc}") from exc
        reader = _BoundedReader(proc.stdout, self.max_output_chars)
        try:
            returncode: int | None = proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            # The whole group: fork is refused in the child, but nothing it might have left may outlive the call.
            # The group id cannot be reused before the group's last member is gone.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        output = reader.result(timeout=2.0)
        return self._report(returncode, output)

    def _report(self, returncode: int | None, output: str) -> str:
        if returncode is None:
            header = f"timed out after {self.timeout_s:g} s (wall clock); the process was killed"
        elif returncode < 0:
            header = f"killed by {_signal_name(-returncode)}{self._signal_hint(-returncode)}"
        elif returncode != 0:
            header = f"exit code {returncode}"
        else:
            return output or "(no output: print what you want to see)"
        return f"{header}\n{output}" if output else header

    def _signal_hint(self, signum: int) -> str:
        if signum == signal.SIGXCPU:
            return f": the CPU time limit of {self.cpu_seconds} s was reached"
        if signum == signal.SIGKILL:
            return f" (CPU time limit of {self.cpu_seconds} s, or out of memory)"
        return ""


def python_tool(**limits: float | int) -> FunctionTool:
    """The `python` tool over a `PythonSandbox(**limits)`. Its own timeout leaves the loop's per-tool timeout out of
    the way: the sandbox reports its wall timeout itself, as text the model can read."""
    sandbox = PythonSandbox(**limits)
    return function_tool(sandbox.run, name="python", description=sandbox.description(),
                         timeout=sandbox.timeout_s + 5.0)


def _environment(workdir: str) -> dict[str, str]:
    """Only what Python needs: nothing of the server's environment (API keys, tokens) is passed on."""
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
            # one thread per numeric library: their per-thread buffers would otherwise eat the memory limit
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _BoundedReader:
    """Drains a pipe on a thread (so the child never blocks on a full pipe) keeping at most `max_chars` bytes: the
    first half and the last half of a longer output, with the number of bytes cut in between."""

    def __init__(self, pipe: IO[bytes], max_chars: int):
        self.pipe, self.keep = pipe, max(max_chars // 2, 1)
        self.head, self.tail, self.total = bytearray(), bytearray(), 0
        self.thread = threading.Thread(target=self._drain, name="python-sandbox-output", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        with self.pipe:
            while chunk := self.pipe.read1(65536):
                self.total += len(chunk)
                room = 2 * self.keep - len(self.head)
                if room > 0:
                    self.head += chunk[:room]
                    chunk = chunk[room:]
                if chunk:
                    self.tail += chunk
                    del self.tail[:-self.keep]

    def result(self, timeout: float) -> str:
        self.thread.join(timeout)
        if not self.tail:
            return self.head.decode("utf-8", errors="replace")
        # Over the limit: the first half of head, then the last `keep` bytes seen (the end of head and tail).
        end = (self.head[self.keep:] + self.tail)[-self.keep:]
        cut = self.total - self.keep - len(end)
        return (self.head[:self.keep].decode("utf-8", errors="replace") + _CUT_MARK.format(cut)
                + end.decode("utf-8", errors="replace"))


def _remove_tree(path: str) -> None:
    """The code may have made its files or folders read-only: make the failing entry and its folder writable and
    retry once."""
    def retry(func, failed, _exc_info):
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(failed), stat.S_IRWXU)
            if os.path.isdir(failed) and not os.path.islink(failed):
                os.chmod(failed, stat.S_IRWXU)
            func(failed)
    shutil.rmtree(path, onerror=retry)
