"""Commands that need an optional extra say which one, in one line, before any model loads."""
import sys

import pytest

from freehold import commands
from freehold.cli import main


@pytest.mark.parametrize("argv, module, extra", [
    (["eval", "structured", "--data", "."], "jsonschema", "eval"),
    (["inspect", "sampling", "--prompt", "Hi"], "matplotlib", "inspect"),
])
def test_a_missing_extra_is_named_before_the_model_loads(argv, module, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails, as when it is not installed

    def load_llm(args):
        raise AssertionError("the model loaded before the missing package was reported")
    monkeypatch.setattr(commands, "load_llm", load_llm)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and module in err and f"pip install 'freehold[{extra}]'" in err
