"""Attention sinks on the default model, measured, and `freehold inspect attention` as a user runs it."""
from freehold.eval.ppl import default_text
from freehold.models.attention_map import measure_sink_attention


def test_most_layers_park_their_attention_on_the_first_tokens(default_llm):
    """128 tokens of the pydoc text, fp32 weights. Measured (2026-12): the first 4 tokens get 5.3x the uniform
    share on average, 25 of 30 layers more than 3x (layers 0, 1 and 11 less than uniform), and token 0 alone
    carries 97% of that mass."""
    ids = default_llm.encode_prompt(default_text()[:1000])[:128]
    result = measure_sink_attention(default_llm.loaded.model, ids, sink_tokens=4)
    assert result.query_start == 8 and 0.05 < result.uniform_share < 0.15
    ratios = [result.ratio(x.sink_share) for x in result.layers]
    assert result.ratio(result.mean_sink_share) > 4.0
    assert sum(r > 3.0 for r in ratios) >= 20, [round(r, 1) for r in ratios]
    assert result.mean_first_token_share > 0.9 * result.mean_sink_share  # the sink is token 0


def test_cli_prints_the_table_and_draws_the_heatmap(tmp_path, capsys, monkeypatch, default_llm):
    """In this process, on the session's loaded default model (`load_llm` itself is the one every model command
    shares); the argument errors stop before any load."""
    from freehold import commands
    from freehold.cli import main
    loads = []
    monkeypatch.setattr(commands, "load_llm", lambda args: loads.append(args.model) or default_llm)
    png = tmp_path / "attention.png"
    prompt = "Attention sinks: softmax needs somewhere to put its mass, so models park it on the first tokens. " * 3
    code = main(["inspect", "attention", "--prompt", prompt, "--sink-tokens", "2", "--png", str(png)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert "first 2" in lines[1] and lines[2].split()[0] == "0" and lines[32].split()[0] == "mean"
    assert float(lines[32].split()[-1]) > 2.0  # the mean ratio to uniform
    assert f"heatmap saved to {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for argv, needle in ((["--sink-tokens", "0"], "--sink-tokens must be at least 1, got 0"),
                         (["--prompt", ""], "the prompt is empty"),
                         (["--prompt-file", str(empty)], "the prompt is empty"),
                         (["--prompt-file", str(tmp_path / "none.txt")], "cannot read --prompt-file")):
        code, (out, err) = main(["inspect", "attention", *argv]), capsys.readouterr()
        assert code == 2 and needle in err and "Traceback" not in err, (argv, err)
    assert loads == [None]  # only the good run loaded a model (the default one)
