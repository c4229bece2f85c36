"""A/B of a native kernel against its source at another git revision, alternated in one process (a development tool;
CI does not run it). On a noisy machine, step-level timings (`freehold bench step`) move by 10-20% between runs;
alternating two builds of one kernel on the same inputs in one process shows differences of a few percent.

    .venv/bin/python scripts/kernel_ab.py attention --base HEAD~1     # decode attention, bf16 KV, 64 x 532 tokens
    .venv/bin/python scripts/kernel_ab.py q8 --base HEAD~1            # the Q8_0 LM head of the default model's shape
    .venv/bin/python scripts/kernel_ab.py int4 --base HEAD~1          # the default model's int4 layers

The base build is `git show BASE:freehold/kernels/<kernel>.c` (and the headers beside it at BASE), compiled with the
flags this tree uses (freehold.kernels.native); the new build is this tree's. Every round runs both builds on the
same inputs (which one goes first alternates), and the script says whether their first round's outputs (NaN-filled
before each call) are bit-identical.
- attention: `--batch` sequences of `--context` tokens each (one decode row per sequence), `--kv` cache element
  type, blocks of 16 tokens scattered at random over a pool of `--layers` layers' worth of blocks; a round is one
  call per layer, layer after layer (so each layer's rows come from memory, as in a decode step).
- q8: a [49152, 576] Q8_0 table (SmolLM2-135M's LM head) against `--rows` rows of x.
- int4: SmolLM2-135M's four int4 matmuls per layer (qkv 960 x 576, o 576 x 576, gate/up 3072 x 576, down 576 x 1536)
  for `--layers` layers, each layer its own weights (so they come from memory, as in a decode step), against
  `--rows` rows of x.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from freehold.kernels import native  # noqa: E402  (before torch: freehold sets libgomp's spin count as the server runs)

import torch  # noqa: E402

P, I, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
SIGNATURES = {  # kernel -> (symbol, argtypes)
    "paged_attention": ("paged_decode_attention", [P, P, P, P, P, P, I, P, P, I, I, I, I, I, I, ctypes.c_float,
                                                   P, P, I64, I64, P, P, I]),
    "quant_matmul": ("q8_matmul", [P, P, P, P, I64, I64, I64]),
    "int4": ("int4_matmul", [P, P, P, P, I64, I64, I64]),
}


def bind(library: Path, kernel: str):
    symbol, argtypes = SIGNATURES[kernel]
    fn = getattr(ctypes.CDLL(str(library)), symbol)
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def base_build(kernel: str, rev: str, folder: Path) -> Path:
    """The kernel's source and headers at `rev`, compiled as native.build compiles this tree's."""
    names = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "freehold/kernels/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in names:
        if name.endswith((".c", ".h")):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True,
                                  check=True).stdout
            (folder / Path(name).name).write_bytes(text)
    out = folder / f"{kernel}-base.so"
    flags = native.FLAGS + native.EXTRA_FLAGS.get(kernel, [])
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")  # as native.build picks it
    subprocess.run([compiler, *flags, str(folder / f"{kernel}.c"), "-o", str(out), "-lm"], check=True)
    return out


def check(status: int, kernel: str) -> None:
    """A kernel's nonzero status as a one-line exit (e.g. the int4 kernel on a CPU without AVX512-VNNI/VBMI)."""
    if status != 0:
        raise SystemExit(f"{kernel} returned status {status}: a CPU or shape the kernel does not run (status 1 or "
                         "3; freehold.kernels.native says which CPU features each kernel needs) or out of memory (2)")


def poison(outputs: list[torch.Tensor]) -> None:
    """NaN in every output before a call (outside its timing), so an element a build leaves unwritten shows up as a
    difference (NaN equals nothing) instead of the other build's value."""
    for out in outputs:
        out.fill_(float("nan"))


def alternate(builds: dict, call, rounds: int) -> None:
    """Run call(fn) -> (seconds, outputs) for each build in turn (base first in even rounds, new first in odd ones),
    `rounds` times; print the medians and whether the builds' outputs are bit-identical."""
    times = {name: [] for name in builds}
    outputs = {}
    for r in range(rounds):
        for name, fn in (list(builds.items()) if r % 2 == 0 else list(builds.items())[::-1]):  # ABBA: no order bias
            seconds, out = call(fn)
            times[name].append(seconds)
            outputs.setdefault(name, out)
    base, new = (statistics.median(times[n]) for n in builds)
    same = all(torch.equal(a, b) for a, b in zip(*outputs.values()))
    print(f"  base {base * 1e3:.2f} ms, new {new * 1e3:.2f} ms (medians of {rounds}): new / base = {new / base:.3f}; "
          f"outputs {'bit-identical' if same else 'DIFFER'}")


def attention(args, builds) -> None:
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16  # the default model's attention
    per_seq = -(-args.context // block_size)
    g = torch.Generator().manual_seed(0)
    pool = args.batch * per_seq * args.layers + 1
    dtype, code = {"fp32": (torch.float32, 0), "bf16": (torch.bfloat16, 1)}[args.kv]
    k = torch.randn(pool, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(pool, block_size, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(pool - 1, generator=g) + 1
    tables = [order[i * args.batch * per_seq:(i + 1) * args.batch * per_seq].view(args.batch, per_seq).contiguous()
              for i in range(args.layers)]
    lens = torch.full((args.batch,), args.context, dtype=torch.int64)
    qs = [torch.randn(args.batch, heads, head_dim, generator=g) for _ in range(args.layers)]

    outs = [torch.zeros(args.batch, heads, head_dim) for _ in range(args.layers)]  # NaN before each call (poison)

    def call(fn):
        poison(outs)
        t0 = time.perf_counter()
        for q, table, out in zip(qs, tables, outs):
            check(fn(q.data_ptr(), out.data_ptr(), k.data_ptr(), v.data_ptr(), None, None, code, table.data_ptr(),
                     lens.data_ptr(), args.batch, per_seq, heads, kv_heads, head_dim, block_size, head_dim ** -0.5,
                     None, None, 0, 0, None, None, 0), "paged_decode_attention")
        return time.perf_counter() - t0, [out.clone() for out in outs]
    print(f"attention: {args.batch} x {args.context} tokens, {args.kv} KV, {args.layers} layers per round")
    alternate(builds, call, args.rounds)


def q8(args, builds) -> None:
    n, k = 49152, 576
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = (torch.rand(n, k // 32, generator=g) * 0.01).half()
    for m in (int(r) for r in args.rows.split(",")):
        x = torch.randn(m, k, generator=g)

        y = torch.zeros(m, n)  # NaN before each call (poison)

        def call(fn):
            poison([y])
            t0 = time.perf_counter()
            check(fn(x.data_ptr(), y.data_ptr(), codes.data_ptr(), scales.data_ptr(), m, n, k), "q8_matmul")
            return time.perf_counter() - t0, [y.clone()]
        print(f"q8 head: {m} rows x [{n}, {k}]")
        alternate(builds, call, args.rounds)


def int4(args, builds) -> None:
    shapes = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K): qkv, o, gate/up, down
    g = torch.Generator().manual_seed(0)
    weights = []
    for _ in range(args.layers):
        for n, k in shapes:
            packed = torch.randint(0, 256, (n // 64, k, 32), dtype=torch.uint8, generator=g)
            scales = torch.rand(k // 32, n, generator=g) * 0.02 + 0.001
            zeros = torch.randn(k // 32, n, generator=g) * 0.01
            pair = torch.stack([scales, zeros], -1).to(torch.bfloat16).contiguous()  # (s, z): s in the low half
            weights.append((packed, pair, n, k))
    for m in (int(r) for r in args.rows.split(",")):
        xs = {k: torch.randn(m, k, generator=g) for _, k in shapes}
        ys = [torch.zeros(m, n) for _, _, n, _ in weights]  # NaN before each call (poison)

        def call(fn):
            poison(ys)
            t0 = time.perf_counter()
            for (packed, pair, n, k), y in zip(weights, ys):
                check(fn(xs[k].data_ptr(), y.data_ptr(), packed.data_ptr(), pair.data_ptr(), m, n, k), "int4_matmul")
            return time.perf_counter() - t0, [y.clone() for y in ys]
        print(f"int4: {m} rows x 4 matmuls x {args.layers} layers")
        alternate(builds, call, args.rounds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kernel", choices=["attention", "q8", "int4"])
    p.add_argument("--base", required=True, help="git revision of the base build (e.g. HEAD~1)")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=532)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--rows", default="1,16,64", help="q8 and int4: rows of x, comma-separated")
    args = p.parse_args()
    source, signature, run = {"attention": ("paged_attention", "paged_attention", attention),  # .c file, SIGNATURES
                              "q8": ("quant_matmul", "quant_matmul", q8),
                              "int4": ("quant_matmul", "int4", int4)}[args.kernel]
    new = native.build(source)
    if new is None:
        raise SystemExit("no C compiler: nothing to compare")
    with tempfile.TemporaryDirectory() as folder:
        builds = {"base": bind(base_build(source, args.base, Path(folder)), signature), "new": bind(new, signature)}
        run(args, builds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
