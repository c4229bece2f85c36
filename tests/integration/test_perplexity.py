"""`freehold eval ppl` agrees with transformers on the same weights and windows (within 0.5%)."""
import math
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
NUM_TOKENS = 1024  # one window (1,023 predictions): `freehold eval ppl`'s full 32,768 is a benchmark, not a test


def test_eval_ppl_matches_transformers(reference):
    from freehold.eval.ppl import default_text
    run = subprocess.run([sys.executable, "-m", "freehold.cli", "eval", "ppl", "--max-tokens", str(NUM_TOKENS),
                          "--weights", "fp32"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    predicted = NUM_TOKENS - NUM_TOKENS // 1024
    ours = float(re.search(rf"perplexity ([0-9.]+) \(.*\) over {predicted} predicted tokens", run.stdout).group(1))

    ref, tok = reference  # transformers on the same GGUF weights (tests/integration/conftest.py)
    ids = tok(default_text(), add_special_tokens=False)["input_ids"][:NUM_TOKENS]
    total = 0.0
    with torch.inference_mode():
        for w in range(NUM_TOKENS // 1024):
            x = torch.tensor([ids[w * 1024:(w + 1) * 1024]])
            logits = ref(x).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
    theirs = math.exp(total / (NUM_TOKENS // 1024 * 1023))
    assert abs(ours - theirs) / theirs < 0.005, (ours, theirs)
    assert 5 < theirs < 30  # the reference measured about 12.7


def test_eval_ppl_kv_policy_reports_each_checkpoint_and_ratio(tmp_path, capsys):
    """The streaming evaluation's CLI on the default model: one row per policy and checkpoint, the ratios against
    the like-for-like reference, flat sink memory, and a clear error for a policy that does not exist."""
    import json

    from freehold.cli import main
    from freehold.eval.ppl import default_text
    text = tmp_path / "text.txt"
    text.write_text(default_text()[:3000])
    # fp32 weights: a 64-token window evicts every 16 tokens, and int4 prefill dequantizes the weights once per
    # 16-token chunk (the default path under sinks is served in test_server_sink.py)
    args = ["eval", "ppl", "--text", str(text), "--window", "64", "--chunk", "32", "--tokens", "160,256",
            "--weights", "fp32", "--out", str(tmp_path)]
    assert main(args + ["--kv-policy", "sink,window,recompute"]) == 0
    record = json.loads((tmp_path / "streaming_ppl.json").read_text())
    rows = {(r[0], r[1]): dict(zip(record["headers"], r)) for r in record["rows"]}
    assert set(rows) == {(p, n) for p in ("sink", "window", "recompute") for n in (160, 256)}
    assert rows["sink", 160]["KV bytes held"] == rows["sink", 256]["KV bytes held"]
    for policy in ("sink", "window"):
        assert rows[policy, 256]["ppl / recompute (same positions)"] > 0
    assert rows["window", 256]["ppl"] > rows["sink", 256]["ppl"]  # no sinks: the StreamingLLM failure case
    assert main(args + ["--kv-policy", "sink,lru"]) == 2
    assert "kv policy must be one of" in capsys.readouterr().err
