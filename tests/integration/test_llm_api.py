"""The Python API on the real model: text matches the tokens, stop strings cut, streaming equals batch."""
from freehold.types import FinishReason, SamplingParams


def test_text_is_the_decoded_tokens(default_llm):
    gen = default_llm.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0))[0]
    comp = gen.completions[0]
    assert comp.finish_reason is FinishReason.LENGTH and len(comp.token_ids) == 12
    assert comp.text == default_llm.tokenizer.decode(comp.token_ids, skip_special_tokens=True)


def test_stop_string_cuts_text_and_stream_matches(default_llm):
    prompt = "Count: 1, 2, 3, 4,"
    full = default_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0))[0].text
    assert " 7," in full
    cut = default_llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0, stop=(" 7,",)))[0]
    assert cut.text == full[:full.index(" 7,")] and cut.completions[0].finish_reason is FinishReason.STOP
    streamed = "".join(default_llm.stream(prompt, SamplingParams(max_tokens=16, temperature=0)))
    assert streamed == full


def test_chat_answers_paris(default_llm):
    gen = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=20, temperature=0))[0]
    assert "Paris" in gen.text and gen.completions[0].finish_reason is FinishReason.STOP
