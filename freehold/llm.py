"""The Python API: `LLM(model).generate(prompts, SamplingParams)` and `.chat(messages)`, on the engine.
`Generation.prompt_logprobs` holds the prompt's logprobs when SamplingParams.prompt_logprobs asks for them."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch

from freehold.config import EngineConfig, SpeculativeMode
from freehold.engine.engine import Engine
from freehold.errors import InvalidRequestError
from freehold.models.loader import LoadedModel, load_model
from freehold.quant.modes import WeightMode
from freehold.text_stream import TextStream, fold_output
from freehold.tokenizer import Tokenizer
from freehold.tools.grammar import tool_constraint
from freehold.tools.parse import ToolCall, parse_tool_calls
from freehold.tools.prompt import template_handles_tools, template_tools, tool_messages
from freehold.tools.spec import ToolRequest, tool_request
from freehold.types import FinishReason, RequestOutput, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from freehold.constrain.compiler import ConstraintCompiler

Message = Mapping[str, object]


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)  # chat with tools: the calls read from `text`
    content: str | None = None  # chat with tools: `text` outside the calls (None when it is empty)


@dataclass
class Generation:
    prompt_token_ids: list[int]
    completions: list[Completion]
    num_cached_tokens: int = 0
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first (no context)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def text(self) -> str:
        return self.completions[0].text


class LLM:
    def __init__(self, model: str | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                 weights: WeightMode = WeightMode.AUTO, engine_config: EngineConfig | None = None,
                 progress: bool = True, chat_template: str | None = None, draft_model: str | None = None,
                 draft_weights: WeightMode | str = WeightMode.INT4, **engine_options):
        """`chat_template`: Jinja source to use instead of the model's own chat template. With
        speculative="draft": `draft_model` (default: the target's own file) loaded with `draft_weights` (default int4:
        a quantized self-draft) proposes the drafts."""
        self.loaded: LoadedModel = load_model(model, dtype=dtype, device=device, progress=progress, weights=weights)
        self.tokenizer = Tokenizer.from_model_path(self.loaded.path)
        if chat_template is not None:
            self.tokenizer.use_chat_template(chat_template)
        config = engine_config or EngineConfig(device=device, dtype=dtype, **engine_options)
        draft = None
        if config.speculative is SpeculativeMode.DRAFT:
            loaded = load_model(draft_model or self.loaded.path, dtype=dtype, device=device, progress=progress,
                                weights=WeightMode(draft_weights))
            draft = (loaded.model, loaded.config, loaded.weight_bytes() / self.loaded.weight_bytes())
        self.engine = Engine(self.loaded.model, self.loaded.config, self.tokenizer.eos_token_ids, config, draft=draft)
        self._ids = itertools.count()
        self._streams: dict[str, list[TextStream]] = {}  # per request, one per completion
        self._compiler: ConstraintCompiler | None = None  # created by the first chat with tools

    # -- public API ---------------------------------------------------------------------------------------
    def describe(self) -> str:
        cfg, budget = self.loaded.config, self.engine.budget
        kv_dtype = str(self.engine.config.cache_dtype).removeprefix("torch.")
        return (f"model {cfg.name} ({self.loaded.path.name}), {cfg.num_parameters() / 1e6:.1f}M parameters, "
                f"{cfg.architecture}, dtype {str(self.engine.config.dtype).removeprefix('torch.')}, "
                f"weights {self.loaded.weight_bytes() / 2**20:.0f} MiB\n"
                f"KV cache {budget.num_bytes / 2**20:.0f} MiB in {kv_dtype} = {budget.num_tokens} tokens "
                f"({budget.bytes_per_token} B/token), {budget.sequences_at(self.engine.max_model_len)} sequence(s) "
                f"at the full context of {self.engine.max_model_len} tokens; prefix cache "
                f"{'on (shared prompt prefixes are stored once)' if self.engine.config.enable_prefix_caching else 'off'}")

    def fingerprint(self) -> str:
        """`fh-<version>-<weights>-kv<dtype>`, e.g. fh-0.1.0-int4-kvfloat32: what produced an output (OpenAI's
        system_fingerprint). Same fingerprint, same seed and same request: the same output."""
        kv_dtype = str(self.engine.config.cache_dtype).removeprefix("torch.")
        return f"fh-{_version()}-{self.loaded.weights or 'float'}-kv{kv_dtype}"

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Generation]:
        """Run all prompts together on the engine (continuous batching) and return them in order. A request that
        fails on its own input mid-way (say, its grammar leaves no token to draw) raises its InvalidRequestError,
        and the call's other requests are aborted."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise InvalidRequestError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        ids = [self._submit(self.encode_prompt(p), sp) for p, sp in zip(prompts, params_list)]
        results = {rid: gen for rid, gen in ids}
        while self.engine.has_unfinished():
            self._step(results)
        return [gen for _, gen in ids]

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             params: SamplingParams = SamplingParams(), *, tools: list[dict] | None = None,
             tool_choice: str | dict | None = None, parallel_tool_calls: bool | None = None) -> list[Generation]:
        """Chat completions. With `tools` (OpenAI-shaped), each completion's `tool_calls` holds the calls made, each
        naming an offered tool with arguments valid for its schema (the decoding is constrained: freehold.tools),
        and `content` the text outside them; tool_choice and parallel_tool_calls as OpenAI defines them."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        request = tool_request(tools, tool_choice, parallel_tool_calls)
        if request is None:
            return self.generate([self.chat_prompt(c) for c in conversations], params)
        spec = tool_constraint(request)
        if spec is not None:
            if params.constraint is not None:
                raise InvalidRequestError("tools cannot be combined with another output constraint", param="tools")
            params = dataclasses.replace(params, constraint=self._constraint_compiler().compile(spec))
        generations = self.generate([self.chat_prompt(c, request) for c in conversations], params)
        for completion in (c for g in generations for c in g.completions):
            if spec is None:  # tool_choice "none": no call can be made, the text is all content
                completion.content = completion.text or None
            else:
                content, completion.tool_calls = parse_tool_calls(completion.text)
                completion.content = content or None
        return generations

    def chat_prompt(self, messages: Sequence[Message], tools: ToolRequest | None = None) -> list[int]:
        """The prompt ids of a conversation; with `tools`, its history rendered as freehold.tools.prompt says."""
        native = template_handles_tools(self.tokenizer)
        messages = tool_messages(messages, tools, native)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tools=template_tools(tools) if native else None)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams()) -> Iterator[str]:
        """Text deltas of one completion as they are generated (for terminal chat)."""
        request_id, gen = self._submit(self.encode_prompt(prompt), params)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id != request_id:
                    continue
                self._raise_if_failed(out, [request_id])
                delta = self._absorb(request_id, gen, out)
                if delta:
                    yield delta

    # -- private ------------------------------------------------------------------------------------------
    def _constraint_compiler(self) -> ConstraintCompiler:
        if self._compiler is None:
            from freehold.constrain.compiler import ConstraintCompiler  # imports xgrammar: only when needed
            self._compiler = ConstraintCompiler(self.tokenizer, self.loaded.config.vocab_size)
        return self._compiler

    def _submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, Generation]:
        request_id = f"llm-{next(self._ids)}"
        self.engine.add_request(request_id, prompt_ids, params)
        self._streams[request_id] = [TextStream(self.tokenizer, params.stop) for _ in range(params.n)]
        return request_id, Generation(prompt_ids, [Completion(i) for i in range(params.n)])

    def _step(self, results: dict[str, Generation]) -> None:
        for out in self.engine.step():
            self._raise_if_failed(out, list(results))
            self._absorb(out.request_id, results[out.request_id], out)

    def _raise_if_failed(self, out: RequestOutput, request_ids: list[str]) -> None:
        """A request that failed on its own input (e.g. its grammar left no token to draw) raises its error here,
        after the call's other requests are aborted so the engine is left idle."""
        if out.error is None:
            return
        for request_id in request_ids:
            self.engine.abort_request(request_id)
            self._streams.pop(request_id, None)
        raise out.error

    def _absorb(self, request_id: str, gen: Generation, out: RequestOutput) -> str:
        """Fold one step's RequestOutput into the Generation; returns completion 0's new text."""
        gen.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            gen.prompt_logprobs = out.prompt_logprobs
        first_delta = ""
        for o in out.outputs:
            comp, stream = gen.completions[o.index], self._streams[request_id][o.index]
            if comp.finish_reason is not None:
                continue
            comp.token_ids += o.token_ids
            comp.logprobs += o.logprobs or []
            folded = fold_output(stream, o)
            if folded.stopped_early:
                self.engine.stop_sequence(request_id, o.index)
            comp.finish_reason = folded.finish_reason
            comp.text += folded.text
            if o.index == 0:
                first_delta = folded.text
        if all(c.finish_reason is not None for c in gen.completions):
            self._streams.pop(request_id, None)
        return first_delta


def _version() -> str:
    try:
        return version("freehold")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "dev"
