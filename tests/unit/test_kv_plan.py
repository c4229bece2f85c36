import json
import subprocess
import sys

from freehold.kv.planner import kv_bytes_per_token, parse_size, plan, read_model_for_plan

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "rope_theta": 500000.0}


def test_default_model_kv_bytes_by_hand(default_model_file):
    cfg, weight_bytes = read_model_for_plan(default_model_file)
    # 30 layers x 2 (K, V) x 3 KV heads x 64 head dim x bytes
    assert kv_bytes_per_token(cfg, "fp16/bf16") == 30 * 2 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(cfg, "fp32") == 46080
    assert kv_bytes_per_token(cfg, "int8") == 30 * 2 * 3 * (64 + 2)
    assert 90e6 < weight_bytes < 110e6  # the Q4_1 file's tensors, not an fp32 copy
    p = plan(cfg, weight_bytes, 4 << 30)
    fp16 = next(r for r in p.rows if r.kv_dtype == "fp16/bf16")
    blocks = ((4 << 30) - weight_bytes) // (23040 * 16)
    assert fp16.tokens == blocks * 16
    assert fp16.requests_at[8192] == blocks // 512


def test_llama3_8b_config_is_128_kib_per_token(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA3_8B))
    cfg, weight_bytes = read_model_for_plan(path)
    assert kv_bytes_per_token(cfg, "fp16/bf16") == 128 * 1024
    assert weight_bytes == cfg.num_parameters() * 2 and 8.0e9 < cfg.num_parameters() < 8.1e9
    out = subprocess.run([sys.executable, "-m", "freehold.cli", "kv-plan", str(path), "--memory", "24G"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "128.00" in out.stdout and "@8192" in out.stdout


def test_parse_size():
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("1000") == 1000
