"""Freehold's model code against Hugging Face transformers on the same weights (the reference)."""
import pytest
import torch

from freehold.models.loader import load_model
from freehold.types import SamplingParams

transformers = pytest.importorskip("transformers")


def test_default_model_logits_match_transformers(reference, default_llm):
    from freehold.eval.ppl import default_text
    ref, tok = reference
    ids = tok(default_text()[:8000])["input_ids"][:512]
    assert len(ids) == 512
    model = default_llm.loaded.model
    x = torch.tensor(ids)
    with torch.inference_mode():
        ours = model.compute_logits(model(x, torch.arange(512)))
        theirs = ref(x[None]).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-3


PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about autumn leaves.",
           "How many legs does a spider have?", "Explain what a Python list is in one sentence."]


def hf_greedy_choices(model, prompt, tokens):
    """transformers' greedy choice after the prompt and after each prefix of `tokens`, in one teacher-forced forward:
    equal to `tokens` exactly when transformers' own greedy loop would generate `tokens` (by induction over the
    positions), at the cost of one forward instead of len(tokens) sequential decode calls."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:]
    return logits.argmax(-1).tolist()


def test_greedy_chat_continuations_match_transformers(reference, default_llm):
    ref, _ = reference
    prompts = [default_llm.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    ours = default_llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    for prompt, gen in zip(prompts, ours):
        tokens = gen.completions[0].token_ids
        assert len(tokens) == 64 and hf_greedy_choices(ref, prompt, tokens) == tokens
    assert "Paris" in default_llm.tokenizer.decode(ours[0].completions[0].token_ids)


def _write_hf_model(tmp_path, config):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama3"])
def test_tiny_hf_models_match_transformers(tmp_path, kind):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
    if kind == "qwen3":  # q/k norm, explicit head_dim and attention bias
        config = Qwen3Config(**common, head_dim=32, attention_bias=True, tie_word_embeddings=False)
    elif kind == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True)
    else:
        config = LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    ref = _write_hf_model(tmp_path, config)
    ours = load_model(tmp_path, progress=False).model
    ids = torch.randint(0, 300, (200,))
    with torch.inference_mode():
        a = ours.compute_logits(ours(ids, torch.arange(200)))
        b = ref(ids[None]).logits[0]
    assert (a - b).abs().max().item() < 1e-4


def test_attention_probabilities_match_transformers_eager_attentions(reference, default_llm):
    """`freehold inspect attention`'s probabilities (post-RoPE q, k from a probe) against transformers' eager
    attention weights (output_attentions=True), every layer and head, on the default model's weights."""
    from freehold.eval.ppl import default_text
    from freehold.models.attention_map import attention_probs_per_layer
    ref, tok = reference
    ids = tok(default_text()[:2000])["input_ids"][:96]
    implementation = ref.config._attn_implementation
    ref.set_attn_implementation("eager")  # the only implementation that returns the probabilities
    try:
        with torch.inference_mode():
            theirs = ref(torch.tensor([ids]), output_attentions=True).attentions  # per layer [1, H, T, T]
    finally:
        ref.set_attn_implementation(implementation)
    ours = attention_probs_per_layer(default_llm.loaded.model, ids)  # per layer [H, T, T]
    assert len(ours) == len(theirs) == 30 and ours[0].shape == (9, 96, 96)
    assert max((a - b[0]).abs().max().item() for a, b in zip(ours, theirs)) < 1e-4
