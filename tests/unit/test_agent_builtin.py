"""freehold.agent.builtin: the calculator's exact grammar and bounds, the python sandbox's limits and refusals (each
run is a real child process, about 0.1 s), read_file's root, file_search over a real store, and the registry."""
import os
import uuid
from fractions import Fraction

import pytest

from freehold.agent.builtin import BUILTIN_NAMES, builtin_tools
from freehold.agent.builtin.calculator import calculator, evaluate
from freehold.agent.builtin.files import read_file_tool
from freehold.agent.builtin.sandbox import PythonSandbox, python_tool
from freehold.agent.functions import ToolArgumentError, function_tool

# ---- calculator --------------------------------------------------------------------------------------------------


EXACT = [
    ("0.1 + 0.2", "3/10 = 0.3"), ("7/3", "7/3 ≈ 2.33333333333"), ("2^10", "1024"), ("2**-3", "1/8 = 0.125"),
    ("(17 * 3 + 4) / 5", "11"), ("-7 // 2", "-4"), ("-7 % 3", "2"), ("1_000.5 * 2", "2001"), ("3 × 4 ÷ 2", "6"),
    ("−3 × 4", "-12"), ("4 ** 0.5", "2"), ("(-8) ** (1/3)", "-2"), ("sqrt(1/4)", "1/2 = 0.5"),
    ("round(7/3, 2)", "233/100 = 2.33"), ("abs(-3) + max(1, 5/2) + min(2, 3)", "15/2 = 7.5"),
    ("gcd(12, 18) * lcm(4, 6)", "72"), ("1e-30 / 3", "1/3000000000000000000000000000000 ≈ 3.33333333333E-31"),
]


@pytest.mark.parametrize("expression, expected", EXACT)
def test_calculator_is_exact(expression, expected):
    assert calculator(expression) == expected


def test_decimal_literals_are_exact_fractions():
    assert evaluate("0.1") == Fraction(1, 10) and evaluate("1e3") == 1000 and evaluate("2.5e-1") == Fraction(1, 4)


@pytest.mark.parametrize("expression, named", [
    ("pi * 2", "the name 'pi'"), ("x.real", "attribute"), ("open('f')", "'open'"), ("1 < 2", "comparison"),
    ("'a' * 3", "'a'"), ("True + 1", "True"), ("1,234", "write 1234"), ("[1, 2]", "list"), ("1 if 2 else 3", "if/else"),
    ("~1", "~"), ("1 << 3", "<<"), ("__import__('os')", "'__import__'"), ("max(*[1])", "positional"),
    ("sqrt(2)", "irrational"), ("(-4) ** 0.5", "not a real number"), ("gcd(1.5, 2)", "integers"), ("2 +", "valid"),
    ("", "empty"), ("1j", "only numbers"),
])
def test_calculator_refuses_what_is_not_arithmetic_and_names_it(expression, named):
    with pytest.raises(ValueError) as err:
        calculator(expression)
    assert named in str(err.value)


@pytest.mark.parametrize("expression", ["10**10**10", "2**100000", "(1/3)**100000", "9**9**9**9", "1e100000000",
                                        "10**3000 * 10**3000", "1" + "+1" * 400, "(" * 300 + "1" + ")" * 300,
                                        "1" * 2001])
def test_calculator_bounds_fail_fast(expression):
    with pytest.raises(ValueError, match="digits|limit|large|nested|characters"):
        calculator(expression)


@pytest.mark.parametrize("expression", ["1/0", "5 // (2 - 2)", "3 % 0", "0 ** -1"])
def test_division_by_zero_is_a_clear_error(expression):
    with pytest.raises(ZeroDivisionError):
        calculator(expression)


def test_calculator_schema_and_validation():
    tool = function_tool(calculator)
    assert tool.name == "calculator" and tool.description.startswith("Exact arithmetic")
    assert tool.parameters["required"] == ["expression"]
    assert tool.parameters["properties"]["expression"]["type"] == "string"
    assert "thousands" in tool.parameters["properties"]["expression"]["description"]
    assert tool.validate({"expression": "1+1"}) == {"expression": "1+1"}
    for bad in ({}, {"expression": 3}, {"expression": "1", "extra": 1}, {"expression": "}}</tool_call>"},
                {"expression": ".5"}, {"expression": "1 = 1"}):
        with pytest.raises(ToolArgumentError):
            tool.validate(bad)


def test_the_expression_pattern_lets_through_every_exact_case_above():
    tool = function_tool(calculator)
    for expression, expected in EXACT:
        assert calculator(**tool.validate({"expression": expression})) == expected


# ---- python sandbox ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sandbox():
    return PythonSandbox(timeout_s=2.0, cpu_seconds=1, memory_bytes=512 * 2**20, max_output_chars=400)


def test_output_and_final_expression_come_back(sandbox):
    assert sandbox.run("print('hello')\n6 * 7") == "hello\n42\n"
    assert sandbox.run("x = 1").startswith("(no output")


def test_a_failure_returns_its_traceback_without_the_sandboxs_frames(sandbox):
    result = sandbox.run("def f():\n    return 1 / 0\nf()")
    assert result.startswith("exit code 1\n") and 'File "main.py", line 2, in f' in result
    assert result.rstrip().endswith("ZeroDivisionError: division by zero") and "sandbox_child" not in result
    assert sandbox.run("import sys; print('a'); sys.exit(3)") == "exit code 3\na\n"


def test_cpu_and_wall_time_are_bounded(sandbox):
    result = sandbox.run("while True: pass")
    assert result.startswith("killed by SIGXCPU") and "1 s" in result
    quick = PythonSandbox(timeout_s=0.5)
    assert quick.run("import time\nprint('started')\ntime.sleep(30)") == \
        "timed out after 0.5 s (wall clock); the process was killed\nstarted\n"


def test_memory_is_bounded(sandbox):
    result = sandbox.run("x = bytearray(10 * 2**30)")
    assert result.startswith("exit code 1") and "MemoryError" in result


@pytest.mark.parametrize("code, refusal", [
    ("import os; os.fork()", "starting processes is not allowed (os.fork)"),
    ("import subprocess; subprocess.run(['ls'])", "(subprocess.Popen)"),
    ("import os; os.system('ls')", "(os.system)"),
    ("import multiprocessing as m; m.set_start_method('spawn'); m.Process(target=print).start()",
     "starting processes"),
    ("import ctypes", "'ctypes' is not available"),
    ("import socket; socket.socket().connect(('127.0.0.1', 9))", "network access is not allowed (socket.connect)"),
    ("import socket; socket.getaddrinfo('example.com', 80)", "network access"),
    ("import os; os.symlink('/etc', 'etc')", "creating links"),
    ("import os; os.kill(1, 0)", "sending signals to processes is not allowed"),
    ("import fcntl; fcntl.ioctl(1, 0)", "ioctl is not allowed"),
    ("import _xxsubinterpreters", "not available in the sandbox"),
    ("import resource; resource.setrlimit(resource.RLIMIT_CPU, (100, 100))", "resource limits"),
    ("import os; fd = os.open('/tmp', os.O_RDONLY); os.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
     "os.open of a directory outside the working directory is not allowed"),
    ("import os; os.mkdir('d'); os.open('x', os.O_WRONLY | os.O_CREAT, dir_fd=os.open('d', os.O_RDONLY))",
     "os.open with a relative path may only read"),
])
def test_processes_network_and_escapes_are_refused(sandbox, code, refusal):
    result = sandbox.run(code)
    assert result.startswith("exit code 1") and refusal in result


@pytest.mark.parametrize("code", ["open({p!r}, 'w').write('x')", "import os; os.mkdir({p!r})",
                                  "import pathlib; pathlib.Path({p!r}).write_text('x')",
                                  "import os; os.open({p!r}, os.O_WRONLY | os.O_CREAT)",
                                  "import os; os.mkfifo({p!r})"])
def test_writing_outside_the_working_directory_is_refused(sandbox, code):
    outside = f"/tmp/outside-{uuid.uuid4().hex}"
    result = sandbox.run(code.format(p=outside))
    assert result.startswith("exit code 1") and "PermissionError" in result
    assert not os.path.exists(outside)


def test_removing_or_changing_files_outside_is_refused(sandbox, tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    for code in (f"import os; os.remove({str(victim)!r})", f"import os; os.rename({str(victim)!r}, 'x')",
                 f"import os; os.chmod({str(victim)!r}, 0)", f"import shutil; shutil.rmtree({str(tmp_path)!r})",
                 f"import os; os.truncate({str(victim)!r}, 0)"):
        assert sandbox.run(code).startswith("exit code 1"), code
    assert victim.read_text() == "keep" and victim.stat().st_mode & 0o777 != 0


def test_the_working_directory_is_writable_private_and_removed(sandbox):
    code = ("import os, tempfile, shutil\nopen('a.txt', 'w').write('x')\nos.mkdir('d')\nos.rename('a.txt', 'd/b.txt')\n"
            "with tempfile.NamedTemporaryFile() as f: pass\nprint(open('d/b.txt').read(), os.listdir('d'))\n"
            "shutil.rmtree('d')\nprint(os.getcwd())")
    first, workdir = sandbox.run(code).splitlines()
    assert first == "x ['b.txt']" and os.path.basename(workdir).startswith("freehold-python-")
    assert not os.path.exists(workdir)
    assert sandbox.run("import os; print(os.listdir('.'))") == "['main.py']\n"  # nothing left from the last call


@pytest.mark.parametrize("code", [
    "import sqlite3; sqlite3.connect({p!r}).execute('create table t(x)')",
    "import sqlite3; sqlite3.connect(':memory:').execute(\"attach database {p!r} as a\")",
    "import _sqlite3", "import readline; readline.write_history_file({p!r})", "import _dbm", "import _gdbm",
    "import dbm; dbm.open({p!r}, 'c')", "import shelve; shelve.open({p!r})",
])
def test_modules_that_write_files_from_c_are_refused(sandbox, code):
    outside = f"/tmp/outside-{uuid.uuid4().hex}"
    result = sandbox.run(code.format(p=outside))
    assert result.startswith("exit code 1") and "is not available in the sandbox" in result
    assert not any(name.startswith(os.path.basename(outside)) for name in os.listdir("/tmp"))


@pytest.mark.parametrize("code", [
    "open(f'/proc/{{os.getppid()}}/environ', 'rb').read()",
    "[open(f'/proc/{{os.getppid()}}/task/{{t}}/environ', 'rb').read() "
    "for t in os.listdir(f'/proc/{{os.getppid()}}/task')]",
    "open(f'/proc/self/root/proc/{{os.getppid()}}/environ', 'rb').read()",
    "os.read(os.open(f'{{os.getppid()}}/environ', os.O_RDONLY, dir_fd=os.open('/proc', os.O_RDONLY)), 9999)",
    "os.mkdir('d'), os.read(os.open(f'../../../../../../../../proc/{{os.getppid()}}/environ', os.O_RDONLY, "
    "dir_fd=os.open('d', os.O_RDONLY)), 9999)",
    "open(f'/proc/{{os.getppid()}}/cmdline', 'rb').read()", "open('/proc/self/environ', 'rb').read()",
])
def test_other_processes_proc_entries_and_environ_are_refused(sandbox, monkeypatch, code):
    monkeypatch.setenv("FREEHOLD_TEST_SECRET", "sk-parent-secret-789")
    result = PythonSandbox(max_output_chars=2000).run("import os\nprint(" + code.format() + ")")
    assert result.startswith("exit code 1") and "PermissionError" in result and "sk-parent" not in result
    assert sandbox.run("print(open('/proc/self/status').readline())").startswith("Name:")  # its own entries: yes


@pytest.mark.parametrize("code, failure", [
    # the reviewer's escapes: the hook through the bootstrap's globals, through gc
    ("import sys; sys._getframe(1).f_globals['Guard'].__call__ = lambda *a: None", "KeyError"),
    ("import gc; [o for o in gc.get_objects() if callable(o)]", "gc.get_objects is not allowed"),
    ("import gc; gc.get_referrers(print)", "gc.get_referrers is not allowed"),
    ("import sys; sys.settrace(lambda *a: None)", "sys.settrace is not allowed"),
    ("import sys; sys._current_frames()", "sys._current_frames is not allowed"),
    ("import cProfile; cProfile.run('1')", "sys.setprofile is not allowed"),
    # what the hook calls cannot be changed from outside it
    ("import os, builtins; os.path.realpath = lambda *a, **k: os.getcwd(); "
     "os.path.commonpath = lambda *a: os.getcwd(); builtins.isinstance = lambda *a: False", "PermissionError"),
    ("class S(str):\n    def split(self, *a): return ['x']\n    def __getitem__(self, i): return 'x'\n"
     "import os; os.remove = None; __builtins__.open(S({p!r}), 'w')", "PermissionError"),
    # a fresh built-in module would have the original os.mkfifo
    ("import _imp, importlib.util; _imp.create_builtin(importlib.util.find_spec('posix')).mkfifo({p!r})",
     "creating the built-in module 'posix' again is not allowed"),
])
def test_the_audit_hook_cannot_be_reached_or_switched_off(sandbox, code, failure):
    outside = f"/tmp/outside-{uuid.uuid4().hex}"
    lines = code.format(p=outside).split("\n")
    if "S(str)" not in code:  # after the attempt, a write outside is still refused
        lines.append(f"open({outside!r}, 'w').write('x')")
    result = sandbox.run("\n".join(lines))
    assert result.startswith("exit code 1") and failure in result, result
    assert not os.path.exists(outside)


def test_the_audit_hook_looks_up_no_global_name_and_holds_no_function_of_its_own():
    import dis

    from freehold.agent.builtin import sandbox_child
    code = sandbox_child.make_audit_hook("/nowhere", 1).__code__
    names = {i.opname for i in dis.get_instructions(code)}
    assert names.isdisjoint({"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "MAKE_FUNCTION", "LOAD_CLOSURE"})
    assert not any(hasattr(const, "co_code") for const in code.co_consts)


def test_common_libraries_warnings_logging_and_tracebacks_still_work(sandbox):
    code = ("import collections, json, logging, traceback, typing, warnings, enum, numpy\n"
            "warnings.warn('careful')\nlogging.warning('logged')\nP = collections.namedtuple('P', 'a b')\n"
            "print(P(1, 2), json.dumps([1]), int(numpy.arange(4).sum()))\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError:\n    traceback.print_exc()\n"
            "open('ok.txt', 'w').write('x'); print(open('ok.txt').read())")
    result = PythonSandbox(timeout_s=10.0, max_output_chars=4000).run(code)
    assert "UserWarning: careful" in result and "WARNING:root:logged" in result and "P(a=1, b=2) [1] 6" in result
    assert "ZeroDivisionError: division by zero" in result and result.rstrip().endswith("x"), result


def test_the_environment_holds_no_secrets(sandbox, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    monkeypatch.setenv("FREEHOLD_API_KEY", "fh-secret-456")
    result = sandbox.run("import os; print(dict(os.environ))")
    assert "secret" not in result and "HOME" in result


def test_output_is_capped_keeping_the_start_and_the_end(sandbox):
    result = sandbox.run("print('START'); print('x' * 100000); print('END')")
    assert result.startswith("START") and result.rstrip().endswith("END") and len(result) < 500
    assert "characters cut" in result


def test_python_tool_schema_and_limits():
    tool = python_tool(timeout_s=3)
    assert tool.name == "python" and "Print what you want to see" in tool.description and "3 s" in tool.description
    assert tool.parameters["required"] == ["code"] and tool.timeout > 3
    assert tool.function(**tool.validate({"code": "print(1 + 1)"})) == "2\n"
    with pytest.raises(ValueError, match="timeout_s"):
        PythonSandbox(timeout_s=0)
    with pytest.raises(ValueError, match="characters"):
        PythonSandbox(max_code_chars=10).run("print('a long program')")


# ---- read_file ---------------------------------------------------------------------------------------------------

@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("héllo")
    (root / "long.txt").write_text("0123456789" * 5)
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "secret.txt").write_text("secret")
    (root / "link").symlink_to(tmp_path / "secret.txt")
    return root


def test_read_file_reads_and_pages(workspace):
    tool = read_file_tool(workspace, max_chars=20)
    read = lambda **args: tool.function(**tool.validate(args))  # noqa: E731
    assert read(path="sub/a.txt") == "héllo" and read(path="./sub/../sub/a.txt") == "héllo"
    first = read(path="long.txt")
    assert first.startswith("0123456789" * 2) and "offset=20" in first
    assert read(path="long.txt", offset=40) == "0123456789"


@pytest.mark.parametrize("path, error", [
    ("../secret.txt", "outside"), ("link", "outside"), ("/etc/passwd", "outside"), ("missing.txt", "no file"),
    ("sub", "folder"), ("blob.bin", "UTF-8"), ("", "empty"),
])
def test_read_file_refuses_what_it_may_not_or_cannot_read(workspace, path, error):
    tool = read_file_tool(workspace)
    with pytest.raises(OSError if error in ("no file", "folder") else ValueError, match=error):
        tool.function(**tool.validate({"path": path}))


# ---- file_search -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    from freehold.embed import Embedder
    from freehold.retrieval.manager import StoreManager
    manager = StoreManager(tmp_path_factory.mktemp("stores"), Embedder())
    animals, kitchen = manager.create("animals").id, manager.create("kitchen").id
    manager.add_file(animals, "cats", "cats.txt", "Cats are small carnivorous mammals. A cat purrs and hunts mice.")
    manager.add_file(animals, "cars", "cars.txt", "Cars are wheeled motor vehicles used on roads and highways.")
    manager.add_file(kitchen, "bread", "bread.txt", "To bake bread, knead flour, water, yeast and salt, then bake.")
    return manager, [animals, kitchen]


def test_file_search_merges_stores_by_score(stores):
    from freehold.agent.builtin.file_search import file_search_tool
    manager, ids = stores
    tool = file_search_tool(manager, ids, max_num_results=2)
    result = tool.function(**tool.validate({"query": "how do I bake bread with yeast"}))
    assert result.startswith("[1] bread.txt (score ") and "knead flour" in result and "[2]" in result
    assert "[3]" not in result
    scores = [float(line.split("(score ")[1].rstrip(")")) for line in result.splitlines() if line.startswith("[")]
    assert scores == sorted(scores, reverse=True)


def test_file_search_refuses_unknown_stores_at_construction(stores):
    from freehold.agent.builtin.file_search import file_search_tool
    from freehold.retrieval.records import StoreNotFoundError
    manager, ids = stores
    with pytest.raises(StoreNotFoundError):
        file_search_tool(manager, [ids[0], "vs_" + "0" * 32])
    with pytest.raises(ValueError, match="at least one"):
        file_search_tool(manager, [])


# ---- registry ----------------------------------------------------------------------------------------------------

def test_builtin_tools_by_name(tmp_path, stores):
    manager, ids = stores
    tools = builtin_tools(list(BUILTIN_NAMES), root=tmp_path, manager=manager, vector_store_ids=ids,
                          python_limits={"timeout_s": 3})
    assert [t.name for t in tools] == list(BUILTIN_NAMES)
    assert all(t.function is not None and t.description for t in tools)


@pytest.mark.parametrize("names, kwargs, error", [
    (["calculator", "shell"], {}, "unknown built-in tool(s): shell"),
    (["calculator", "calculator"], {}, "twice"),
    (["read_file"], {}, "root"),
    (["file_search"], {}, "vector store"),
])
def test_builtin_tools_name_what_is_wrong(names, kwargs, error):
    with pytest.raises(ValueError) as err:
        builtin_tools(names, **kwargs)
    assert error in str(err.value)
