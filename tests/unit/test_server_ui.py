"""The chat page's HTTP side (freehold.server.ui.page) without a model: what is served, with which headers, open or
behind the API key, and off with --no-ui. The page itself runs in a browser in tests/integration/test_web_ui.py."""
import argparse
import asyncio
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from freehold.server.app import create_app
from freehold.server.limits import ServerLimits
from freehold.server import main as server_main
from freehold.server.main import add_serve_arguments
from freehold.server.auth import OPEN_PATHS
from freehold.server.ui.page import STATIC_DIR, load_static, page_paths

ROOT = Path(__file__).resolve().parents[2]


def client(ui: bool = True, api_key: str | None = None) -> TestClient:
    serving = SimpleNamespace(limits=ServerLimits(), retrieval=None)  # no route below touches the engine
    return TestClient(create_app(serving, api_key, ui=ui))


def test_the_page_and_its_files_carry_a_strict_policy():
    c = client()
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe" not in policy  # no inline script, no eval
    script = c.get("/ui/app.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["x-content-type-options"] == "nosniff"
    assert c.get("/ui/vendor/purify.es.mjs").status_code == 200


@pytest.mark.parametrize("path", ["/ui/nope.js", "/ui/%2e%2e/page.py", "/ui/vendor/README.md", "/ui/index.html"])
def test_only_listed_files_are_served(path):
    assert client().get(path).status_code == 404


def test_the_page_is_open_behind_an_api_key_and_the_api_is_not():
    c = client(api_key="k")
    opened = page_paths(load_static())
    assert "/" in opened and "/ui/app.js" in opened and "/ui/index.html" not in opened
    assert all(c.get(path).status_code == 200 for path in opened)
    assert c.get("/debug/engine").status_code == 401
    assert c.get("/v1/models").status_code == 401


def test_every_other_route_needs_the_key():
    """Deny by default: each route of the app (path parameters filled in), with each of its methods, is 401 without
    the key unless its path is one of the exact open ones; an unknown file under /ui/ too."""
    c = client(api_key="k")
    opened = OPEN_PATHS | page_paths(load_static())
    checked = set()
    for template, methods in route_table(c.app.routes):
        path = re.sub(r"\{[^}]+\}", "x", template)
        if path in opened:
            continue
        for method in methods:
            assert c.request(method, path).status_code == 401, (method, path)
            checked.add(template)
    assert {"/v1/chat/completions", "/v1/models/{model_id:path}", "/debug/engine", "/ui/{name:path}"} <= checked
    assert c.get("/ui/nope.js").status_code == 401


def route_table(routes, prefix: str = ""):
    """(path template, methods) of every route, into included routers (FastAPI >= 0.140 keeps them nested)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from route_table(included.routes, prefix + route.include_context.prefix)
        else:
            yield prefix + route.path, sorted(getattr(route, "methods", None) or {"GET"})


def raw_status(app, path: str, root_path: str = "") -> int:
    """Status of GET `path` sent to the ASGI app as a hand-built scope (no client normalizes the path)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": root_path, "query_string": b"", "headers": [],
             "server": ("testserver", 80), "client": ("testclient", 1234)}
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


@pytest.mark.parametrize("path, root_path", [
    ("/ui/v1/models", "/ui"),  # the router sees /v1/models: a prefix rule on /ui/ would let it through
    ("/ui/app.js", "/ui"),  # the router sees /app.js, no page file
    ("/ui/../v1/models", ""), ("//v1/models", ""), ("/ui//v1/models", ""), ("/v1/models/", ""), ("/ui", ""),
])
def test_no_spelling_of_a_path_gets_past_the_key(path, root_path):
    assert raw_status(client(api_key="k").app, path, root_path) == 401


def test_raw_requests_for_the_page_files_are_open():
    app = client(api_key="k").app
    assert raw_status(app, "/ui/app.js") == 200
    assert raw_status(app, "/ui/", root_path="/ui") == 200  # the router sees /: the page


def test_no_ui_turns_the_page_off():
    c = client(ui=False)
    assert c.get("/").status_code == 404
    assert c.get("/ui/app.js").status_code == 404
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    assert parser.parse_args(["--no-ui"]).no_ui and not parser.parse_args([]).no_ui


@pytest.mark.parametrize("flags, page_status", [([], 200), (["--no-ui"], 404)])
def test_serve_passes_no_ui_to_the_app(monkeypatch, capsys, flags, page_status):
    """`freehold serve` (freehold.server.main.serve) with the model, the engine and uvicorn replaced: the app it
    would run serves the page, or not with --no-ui, and the startup lines say so."""
    served = []

    class Runner:  # stands in for DrainingServer: keeps the app instead of serving it
        def __init__(self, config, serving, grace_s):
            served.append(config.app)

        def run(self, sockets):
            pass

    llm = SimpleNamespace(engine=None, tokenizer=None, fingerprint=lambda: "fp", describe=lambda: "a model")
    for name, value in [("_load", lambda args: llm), ("_load_embedder", lambda path, device: None),
                        ("AsyncEngine", lambda engine: SimpleNamespace(shutdown=lambda: None)),
                        ("Serving", lambda *args, **kwargs: SimpleNamespace(limits=ServerLimits(), retrieval=None)),
                        ("_open_retrieval", lambda *args: None), ("_open_conversations", lambda *args: None),
                        ("install_log_rate_limit", lambda: None), ("_log_to_stderr", lambda: None),
                        ("DrainingServer", Runner)]:
        monkeypatch.setattr(server_main, name, value)
    assert server_main.main(["--port", "0", *flags]) == 0
    assert TestClient(served[0]).get("/").status_code == page_status
    assert ("chat page at http://127.0.0.1:" in capsys.readouterr().out) == (page_status == 200)


def test_every_file_the_page_loads_is_served_and_shipped():
    files = load_static()
    html = files["index.html"].body.decode()
    referenced = re.findall(r'(?:src|href)="/ui/([^"]+)"', html)
    assert referenced and all(name in files for name in referenced)
    for name, f in files.items():  # every module import resolves to a served file
        if name.endswith((".js", ".mjs")) and not name.startswith("vendor/"):
            for target in re.findall(r"from '\./([^']+)'", f.body.decode()):
                assert (Path(name).parent / target).as_posix() in files, f"{name} imports missing {target}"
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.relative_to(STATIC_DIR.parent).as_posix() for g in globs["freehold.server.ui"]
               for p in STATIC_DIR.parent.glob(g) if p.is_file()}
    on_disk = {p.relative_to(STATIC_DIR.parent).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()}
    assert on_disk == shipped  # the wheel carries every file, licenses of the vendored code included
