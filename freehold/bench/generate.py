"""Single-stream generation: prefill and decode tokens/s, Freehold beside transformers on the same weights and,
when llama-cpp-python is installed, llama.cpp on the same GGUF with as many threads. The systems take turns
(one repeat of each, then the next round), so a slow minute on a shared machine hits all of them alike."""
from __future__ import annotations

import argparse
import importlib.util

from freehold.bench.common import Timer, pydoc_token_ids, write_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--weights", default="auto", choices=["auto", "fp32", "bf16", "int8", "int4"])
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--no-llama-cpp", action="store_true")


def freehold_timings(llm, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    from freehold.types import SamplingParams
    llm.engine.reset_prefix_cache()
    with Timer() as t_prefill:
        llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    llm.engine.reset_prefix_cache()
    with Timer() as t_total:
        llm.generate(prompt, SamplingParams(max_tokens=decode_tokens + 1, temperature=0, ignore_eos=True))
    return t_prefill.seconds, t_total.seconds - t_prefill.seconds


def llama_cpp_model(path, context: int):
    """The GGUF in llama.cpp (llama-cpp-python) with torch's thread count; logits kept for every position."""
    import torch
    try:
        from llama_cpp import Llama
    except ImportError as exc:  # installed, but something it needs is not (llama_cpp imports diskcache, numpy, ...)
        raise SystemExit(f"llama-cpp-python is installed but does not import ({exc}): install what it lacks, or "
                         "uninstall it to leave out the llama.cpp row") from None
    threads = torch.get_num_threads()
    return Llama(str(path), n_ctx=context, n_threads=threads, n_threads_batch=threads, n_batch=512, logits_all=True,
                 verbose=False)


def llama_cpp_timings(model, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    """Prefill of `prompt`, then greedy decode of `decode_tokens` one token per eval, as Freehold's loop does."""
    import numpy as np
    model.reset()
    with Timer() as t_prefill:
        model.eval(prompt)
    token = int(np.argmax(model.scores[len(prompt) - 1]))
    with Timer() as t_decode:
        for _ in range(decode_tokens):
            model.eval([token])
            token = int(np.argmax(model.scores[model.n_tokens - 1]))
    return t_prefill.seconds, t_decode.seconds


def transformers_timings(model, prompt: list[int], decode_tokens: int) -> tuple[float, float]:
    import torch
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        with Timer() as t_prefill:
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        with Timer() as t_total:
            model.generate(ids, max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1, do_sample=False)
    return t_prefill.seconds, t_total.seconds - t_prefill.seconds


def run(args: argparse.Namespace) -> int:
    from freehold.llm import LLM
    from freehold.quant.modes import WeightMode
    llm = LLM(args.model, progress=False, kv_cache_memory=256 << 20, weights=WeightMode(args.weights))
    prompt = pydoc_token_ids(llm.tokenizer)[:args.prompt_tokens]
    systems = [("freehold", lambda: freehold_timings(llm, prompt, args.decode_tokens))]
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM
        path = llm.loaded.path
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name) if path.is_file() \
            else AutoModelForCausalLM.from_pretrained(str(path))
        ref.eval()
        systems.append(("transformers fp32", lambda: transformers_timings(ref, prompt, args.decode_tokens)))
    if not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None and llm.loaded.path.is_file():
        cpp = llama_cpp_model(llm.loaded.path, args.prompt_tokens + args.decode_tokens + 8)
        systems.append(("llama.cpp", lambda: llama_cpp_timings(cpp, prompt, args.decode_tokens)))
    for _, fn in systems:
        fn()  # warm-up
    runs = {name: [] for name, _ in systems}
    for _ in range(args.repeats):  # rounds: each system once per round
        for name, fn in systems:
            runs[name].append(fn())
    rows, best = [], {}
    for name, _ in systems:
        prefill, decode = min(r[0] for r in runs[name]), min(r[1] for r in runs[name])
        best[name] = (args.prompt_tokens / prefill, args.decode_tokens / decode)
        weights = {"freehold": f"weights {args.weights}", "llama.cpp": "the GGUF as stored"}.get(name, "weights fp32")
        rows.append([name, weights, round(best[name][0], 1), round(best[name][1], 1)])
    if "transformers fp32" in best:
        base = best["transformers fp32"]
        for row, name in zip(rows, best):
            row += [round(best[name][0] / base[0], 2), round(best[name][1] / base[1], 2)]
        headers = ["system", "weights", "prefill tok/s", "decode tok/s", "prefill x", "decode x"]
    else:
        headers = ["system", "weights", "prefill tok/s", "decode tok/s"]
    write_results("generate", headers, rows, {"prompt_tokens": args.prompt_tokens,
                                              "decode_tokens": args.decode_tokens}, args.out)
    return 0
