"""The first code the `python` tool's child process runs (`python -I -u sandbox_child.py WORKDIR LIMITS_JSON`): set
resource limits, install an audit hook that refuses what the sandbox forbids, then run WORKDIR/main.py as `__main__`.

Standard library only, and nothing from freehold: this file runs in the child, not in the server. The audit hook is a
Python-level guard against accidents and casual misuse, not a security boundary (docs/agent-tools.md says what it
does not stop): it refuses writes outside WORKDIR, other processes' /proc entries, new processes, sockets that connect
or bind, name lookups, ctypes, the modules that write files from C, and the introspection that would reach the hook.
"""
import ast
import builtins
import json
import os
import posix
import resource
import stat
import sys
import traceback
import types
from types import MappingProxyType

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

_REFUSED = {  # event -> why, for events refused whatever their arguments
    **dict.fromkeys(["os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                     "subprocess.Popen", "os.startfile", "pty.spawn"], "starting processes is not allowed"),
    **dict.fromkeys(["os.kill", "os.killpg"], "sending signals to processes is not allowed"),
    **dict.fromkeys(["socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
                     "socket.gethostbyname", "socket.gethostbyaddr", "socket.sethostname"],
                    "network access is not allowed"),
    **dict.fromkeys(["os.link", "os.symlink"], "creating links is not allowed"),
    **dict.fromkeys(["resource.setrlimit", "resource.prlimit"], "changing resource limits is not allowed"),
    "fcntl.ioctl": "ioctl is not allowed",
}
# Modules that reach C memory or another interpreter (without this hook): ctypes, cffi, the test C APIs,
# sub-interpreters; _posixsubprocess starts processes without an audit event (patched out below); sqlite3 (connect,
# ATTACH), readline (write_history_file) and the dbm modules write files from C, with no audit event.
_BLOCKED_MODULES = {"ctypes", "_ctypes", "cffi", "_cffi_backend", "_xxsubinterpreters", "_xxinterpchannels",
                    "_testcapi", "_testinternalcapi", "_testmultiphase", "_testsinglephase", "_posixsubprocess",
                    "sqlite3", "_sqlite3", "readline", "dbm", "_dbm", "_gdbm"}
# Events that reach every object (so the hook's), other threads' frames, or install a tracer.
_INTROSPECTION = {"gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames", "sys.settrace",
                  "sys.setprofile"}
# Events that change the filesystem: event -> [(index of a path, index of its dir_fd or None)].
_PATH_EVENTS = {
    "os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)], "os.rename": [(0, 2), (1, 3)],
    "os.chmod": [(0, 2)], "os.chown": [(0, 3)], "os.utime": [(0, 3)], "os.truncate": [(0, None)],
    "os.setxattr": [(0, None)], "os.removexattr": [(0, None)], "os.chflags": [(0, None)],
    "os.lchflags": [(0, None)], "os.lchmod": [(0, None)],
}


class SandboxPermissionError(PermissionError):
    """What the sandbox refuses (the name the model reads in the traceback)."""


def make_audit_hook(workdir: str, pid: int):
    """The audit hook for a run in `workdir` by process `pid`.

    The code can reach this module's globals (through frames or tracebacks), change any module (os.path.realpath,
    builtins.isinstance) and read a frame's locals. So the hook keeps its state in its closure, copied here, and uses
    only C functions and immutable values: no global name, no Python function of a module, no nested function whose
    cells the code could rewrite. tests/unit/test_agent_builtin.py checks its bytecode for that. It must not itself do
    anything that raises an audited event it refuses.
    """
    refused, blocked = MappingProxyType(dict(_REFUSED)), frozenset(_BLOCKED_MODULES)
    path_events = MappingProxyType({event: tuple(places) for event, places in _PATH_EVENTS.items()})
    introspection = frozenset(_INTROSPECTION)
    lstat, readlink, getcwd = posix.lstat, posix.readlink, posix.getcwd
    str_copy, bytes_decode, isinstance_, len_ = str.__getitem__, bytes.decode, isinstance, len
    int_, str_, bytes_, bool_ = int, str, bytes, bool
    write_flags, link_mode, dir_mode, mode_mask = _WRITE_FLAGS, stat.S_IFLNK, stat.S_IFDIR, stat.S_IFMT(0o177777)
    own_pid, everything = str(pid), slice(None)
    refusal, import_error, os_error, any_error = SandboxPermissionError, ImportError, OSError, BaseException

    def hook(event, args):
        if event in refused:
            raise refusal(f"{refused[event]} ({event})")
        if event[:7] == "ctypes.":
            raise refusal(f"ctypes is not allowed ({event})")
        if event == "import":
            if args[0] in blocked:
                raise import_error(f"the module {args[0]!r} is not available in the sandbox", name=args[0])
            return
        if event in introspection:
            raise refusal(f"{event} is not allowed in the sandbox (it reaches the interpreter's own state)")
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if isinstance_(path, int_):  # an fd already open: its mode was checked when it was opened
                return
            writing = (isinstance_(mode, str_) and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)) \
                or bool_((flags or 0) & write_flags)
            checks = ((path, None, writing, mode is None),)  # mode None: os.open, whose event carries no dir_fd
        elif event in path_events:
            checks = ()
            for path_at, dir_fd_at in path_events[event]:
                checks += ((args[path_at], None if dir_fd_at is None else args[dir_fd_at], True, False),)
        else:
            return
        for path, dir_fd, writing, os_open in checks:
            # The path as an exact str (a str subclass could lie through its methods), made absolute.
            try:
                if isinstance_(path, int_):  # os.fchmod(fd) and the like: the file the descriptor points to
                    text = readlink(f"/proc/self/fd/{int_(path)}")
                elif isinstance_(path, bytes_):
                    text = bytes_decode(path, "utf-8", "surrogateescape")
                else:
                    text = str_copy(path, everything)
                relative = text[:1] != "/"
                if relative and os_open and (writing or ".." in text.split("/")):
                    raise refusal(f"os.open with a relative path may only read below the current directory "
                                  f"(use an absolute path in {workdir}, or open()): {text!r}")
                if relative and dir_fd is not None and dir_fd != -1:
                    text = readlink(f"/proc/self/fd/{int_(dir_fd)}") + "/" + text
                elif relative:
                    text = getcwd() + "/" + text
                # realpath, with lstat and readlink only: follows symlinks (/proc/self, /proc/<pid>/root as well)
                target, todo, links = "", text.split("/")[::-1], 0
                while todo:
                    name = todo.pop()
                    if name == "" or name == ".":
                        continue
                    if name == "..":
                        target = target.rpartition("/")[0]
                        continue
                    candidate = target + "/" + name
                    try:
                        kind = lstat(candidate).st_mode & mode_mask
                    except os_error:
                        kind = 0
                    if kind != link_mode:
                        target = candidate
                        continue
                    links += 1
                    if links > 40:
                        raise refusal(f"too many symbolic links in {text!r}")
                    link = readlink(candidate)
                    if link[:1] == "/":
                        target = ""
                    todo += link.split("/")[::-1]
                target = target or "/"
            except refusal:
                raise
            except any_error:  # noqa: B036 - whatever went wrong, the path is not known to be allowed
                raise refusal(f"{event}: the path {path!r} could not be checked") from None
            inside = target == workdir or target[:len_(workdir) + 1] == workdir + "/"
            if target[:6] == "/proc/":
                parts = target.split("/")
                if parts[2].isdigit() and parts[2] != own_pid or "environ" in parts:
                    raise refusal(f"reading other processes' /proc entries or any environ is not allowed: {path!r}")
            if writing and not inside:
                raise refusal(f"{event} outside the working directory is not allowed: {path!r} "
                              f"(write under {workdir}, the current directory)")
            if os_open and not inside:
                try:
                    kind = lstat(target).st_mode & mode_mask
                except os_error:
                    kind = 0
                if kind == dir_mode:  # a dir_fd there would let a relative os.open reach any file, /proc's too
                    raise refusal(f"os.open of a directory outside the working directory is not allowed: {path!r}")

    return hook


def set_limits(limits: dict) -> None:
    """Soft and hard limits alike, so the code cannot raise them again (resource.setrlimit is refused as well)."""
    cpu = limits["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU at the soft limit, SIGKILL a second later
    for kind, value in ((resource.RLIMIT_AS, limits["memory_bytes"]), (resource.RLIMIT_FSIZE, limits["max_file_bytes"]),
                        (resource.RLIMIT_NOFILE, limits["max_open_files"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(kind, (value, value))


def disable_unaudited_functions() -> None:
    """Functions that change the system without raising an audit event: _posixsubprocess.fork_exec starts a process
    (multiprocessing calls it directly), os.mknod makes device files and os.mkfifo pipes anywhere. Replaced in
    every place that refers to them; re-importing _posixsubprocess is refused by the hook. A built-in module can be
    created afresh (with its original functions) by _imp.create_builtin, which raises no audit event: every built-in
    module is imported now and create_builtin replaced."""
    import _imp
    import _posixsubprocess
    import importlib
    import posix
    import subprocess

    def refused(*_args, **_kwargs):
        raise SandboxPermissionError("starting processes or making device files is not allowed")

    _posixsubprocess.fork_exec = subprocess._fork_exec = refused
    for name in ("mknod", "mkfifo"):
        original = getattr(os, name, None)
        for functions in (os.supports_dir_fd, os.supports_fd, os.supports_follow_symlinks,
                          os.supports_effective_ids):
            functions.discard(original)
        setattr(os, name, refused)
        setattr(posix, name, refused)
    for name in sys.builtin_module_names:
        if name not in _BLOCKED_MODULES:
            importlib.import_module(name)
    _imp.create_builtin = refused_builtin


def refused_builtin(spec, *_args):
    raise SandboxPermissionError(f"creating the built-in module {getattr(spec, 'name', spec)!r} again is not allowed")


def run_main(path: str) -> None:
    """Run the code as `__main__` in a fresh module; a final expression's value is printed, as in a notebook.
    A traceback shows the code's frames only (not this file's)."""
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__ = path, builtins
    sys.modules["__main__"], sys.argv = main, [path]
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, path, "exec"), main.__dict__)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), path, "eval"), main.__dict__)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: B036 - the code's failure, reported like the interpreter does
        report = traceback.TracebackException(type(exc), exc, exc.__traceback__)
        report.stack = traceback.StackSummary.from_list(_code_frames(report.stack, path))
        sys.stderr.write("".join(report.format()))
        sys.exit(1)


def _code_frames(frames: list, path: str) -> list:
    """From the code's first frame on (not run_main's, nor ast.parse's for a syntax error), without the audit
    hook's frame that raised a refusal."""
    first = next((i for i, f in enumerate(frames) if f.filename == path), len(frames))
    return [f for f in frames[first:] if f.filename != __file__]


def main() -> None:
    workdir, limits = os.path.realpath(sys.argv[1]), json.loads(sys.argv[2])
    set_limits(limits)
    disable_unaudited_functions()
    sys.addaudithook(make_audit_hook(workdir, os.getpid()))  # referred to by the interpreter only
    run_main("main.py")


if __name__ == "__main__":
    main()
