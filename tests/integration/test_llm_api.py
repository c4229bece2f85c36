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
    # `freehold eval memory` renders prompts (to see what a sink window keeps) as LLM.chat does
    from freehold.commands import llm_prompt
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    assert llm_prompt(default_llm.tokenizer, messages) == default_llm.chat_prompt(messages)


def test_a_stop_string_at_the_final_flush_ends_as_stop_in_both_apis(default_llm, server):
    """One rule folds engine outputs into text for the Python API and the server (text_stream.fold_output)."""
    import openai

    from tests.integration.conftest import MODEL_NAME
    byte_token = default_llm.tokenizer.token_to_id("â")  # the lone byte 0xE2: half a character
    assert default_llm.tokenizer.decode([byte_token]) == "\ufffd"
    # held back as incomplete until the end, where the final flush yields U+FFFD: the stop string matches only there
    params = dict(max_tokens=1, temperature=0, logit_bias={byte_token: 100.0}, stop=("\ufffd",))
    comp = default_llm.generate("Hello", SamplingParams(**params))[0].completions[0]
    assert comp.token_ids == [byte_token] and comp.text == ""
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    served = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=1, temperature=0,
                                       logit_bias={str(byte_token): 100}, stop=["\ufffd"]).choices[0]
    assert served.text == comp.text
    assert served.finish_reason == comp.finish_reason.value == "stop"


def test_a_request_failing_mid_way_raises_and_leaves_the_engine_idle(default_llm):
    """The grammar `[ab][^\\s\\S]` allows one character and then nothing (it branches first, so the compiler's
    empty-language check lets it through): that request's own error is raised (not a
    batch failure), the call's other request is aborted, and the next call runs normally."""
    import pytest

    from freehold.constrain.compiler import ConstraintCompiler
    from freehold.constrain.spec import Regex
    from freehold.errors import InvalidRequestError

    compiler = ConstraintCompiler(default_llm.tokenizer, default_llm.loaded.config.vocab_size)
    dead_end = SamplingParams(max_tokens=8, temperature=0, constraint=compiler.compile(Regex(r"[ab][^\s\S]")))
    with pytest.raises(InvalidRequestError, match="exclude every token"):
        default_llm.generate(["Hello", "Say a"], [SamplingParams(max_tokens=8, temperature=0), dead_end])
    assert not default_llm.engine.has_unfinished()
    default_llm.engine.check_integrity()
    assert default_llm.generate("The capital of France is", SamplingParams(max_tokens=4, temperature=0))[0].text
