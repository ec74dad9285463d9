"""Micro-benchmark: vLLM 0.32.0's CPU torch LoRA ops vs ours (per-op fix and fast path).

Times one LoRA linear layer the way PunicaWrapperCPU.add_lora_linear runs it: per output
slice, a shrink into an fp32 buffer, then an expand_slice into the bf16/fp32 output at
the slice's offset. Both implementations run in the same process on the same tensors,
interleaved trial by trial so background load hits both alike; the table shows the
median per layer call and the ratio.

    python -m loadtests micro lora-ops --tokens 8 --slots 4
    python -m loadtests micro lora-ops --tokens 512 --slots 4 --requests 4

Requests are laid out back to back (request r gets `tokens // requests` rows, the last
one the remainder) and request r uses slot r % slots; --base-every K makes every K-th
request a base-model request (index -1; upstream then computes the wrong thing, which
does not change its cost). vLLM V1 always calls the sgmv form (--form sgmv).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from server.engine.lora import ops as ours
from server.engine.lora.apply import apply_lora
from server.engine.lora.pack import build_pack
from server.engine.lora.plan import plan_step

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def _layout(tokens: int, requests: int, slots: int, base_every: int) -> list[int]:
    per = max(tokens // requests, 1)
    row_slots: list[int] = []
    for r in range(requests):
        n = per if r < requests - 1 else tokens - per * (requests - 1)
        slot = -1 if base_every and (r + 1) % base_every == 0 else r % slots
        row_slots += [slot] * max(n, 0)
    return row_slots[:tokens]


def _segments(
    row_slots: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]:
    # what vLLM's compute_meta() hands the sgmv ops
    index = torch.tensor(row_slots, dtype=torch.long)
    seg_slots, seg_lens = torch.unique_consecutive(index, return_counts=True)
    starts = torch.zeros_like(seg_lens)
    starts[1:] = torch.cumsum(seg_lens, 0)[:-1]
    return starts, seg_lens, seg_slots, len(seg_slots), int(seg_lens.max()), len(row_slots)


def _layer_fn(
    ops: ModuleType,
    form: str,
    x: torch.Tensor,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    y: torch.Tensor,
    out_dims: list[int],
    row_slots: list[int],
) -> Callable[[], None]:
    rank = lora_a[0].shape[2]
    buffers = [torch.zeros(x.shape[0], rank, dtype=torch.float32) for _ in out_dims]
    idx = torch.tensor(row_slots, dtype=torch.long)
    seg = _segments(row_slots)

    def run() -> None:
        for i in range(len(out_dims)):
            if form == "sgmv":
                ops.sgmv_shrink(x, lora_a[i], buffers[i], *seg, 0.5)
            else:
                ops.bgmv_shrink(x, lora_a[i], buffers[i], idx, 0.5)
        offset = 0
        for i, width in enumerate(out_dims):
            if form == "sgmv":
                ops.sgmv_expand_slice(buffers[i], lora_b[i], y, *seg, offset, width, True)
            else:
                ops.bgmv_expand_slice(buffers[i], lora_b[i], y, idx, offset, width, True)
            offset += width

    return run


def _time(fn: Callable[[], None], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8, 512])
    parser.add_argument("--slots", type=int, default=4, help="adapter slots (max_loras)")
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests in the batch (default: one per token up to 32 tokens, else --slots)",
    )
    parser.add_argument("--base-every", type=int, default=0, help="every K-th request is base")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument(
        "--out-dims",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[576, 192, 192],
        help="output slices, comma separated (default: a qkv projection)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--form", choices=["sgmv", "bgmv"], default="sgmv")
    parser.add_argument("--iters", type=int, default=20, help="layer calls per trial")
    parser.add_argument("--trials", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    return parser


@dataclass(frozen=True)
class _Layer:
    """One layer call per implementation, on the same inputs, each into its own output."""

    upstream: Callable[[], None]
    ours: Callable[[], None]
    fast: Callable[[], None]
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # upstream's, ours, fast's

    def run_all(self) -> None:
        self.upstream()
        self.ours()
        self.fast()


def _layer(
    args: argparse.Namespace, row_slots: list[int], gen: torch.Generator, upstream: ModuleType
) -> _Layer:
    dtype, tokens = DTYPES[args.dtype], len(row_slots)
    x = torch.randn(tokens, args.hidden, generator=gen).to(dtype)
    lora_a = [
        (torch.randn(args.slots, 1, args.rank, args.hidden, generator=gen) * 0.05).to(dtype)
        for _ in args.out_dims
    ]
    lora_b = [
        (torch.randn(args.slots, 1, d, args.rank, generator=gen) * 0.05).to(dtype)
        for d in args.out_dims
    ]
    y_up = torch.zeros(tokens, sum(args.out_dims), dtype=dtype)
    y_ours, y_fast = y_up.clone(), y_up.clone()
    run_up = _layer_fn(upstream, args.form, x, lora_a, lora_b, y_up, args.out_dims, row_slots)
    run_ours = _layer_fn(ours, args.form, x, lora_a, lora_b, y_ours, args.out_dims, row_slots)
    # The fast path as the engine runs it: plan once per step, pack once per adapter
    # load (both outside the timed layer call), then one apply per layer call.
    plan = plan_step(row_slots)
    pack = build_pack(lora_a, lora_b, args.out_dims)
    run_fast = functools.partial(apply_lora, y_fast, x, pack, plan, 0.5)
    return _Layer(run_up, run_ours, run_fast, (y_up, y_ours, y_fast))


def _max_diff(layer: _Layer, row_slots: list[int]) -> float:
    """Ours and the fast path against upstream where upstream is right (rows with an
    adapter); 0 for no rows."""
    y_up, y_ours, y_fast = layer.outputs
    lora_rows = [t for t, s in enumerate(row_slots) if s >= 0]
    return max(
        (y_up[lora_rows].float() - y[lora_rows].float()).abs().max().item()
        for y in (y_ours, y_fast)
    )


def _row(args: argparse.Namespace, tokens: int, gen: torch.Generator, upstream: ModuleType) -> str:
    """One line of the table: the medians (us per layer call) and the ratios."""
    requests = args.requests or (tokens if tokens <= 32 else args.slots)
    row_slots = _layout(tokens, requests, args.slots, args.base_every)
    layer = _layer(args, row_slots, gen, upstream)
    layer.run_all()
    diff = _max_diff(layer, row_slots)
    for _ in range(3):  # warm-up (oneDNN primitive caches, allocator)
        layer.run_all()
    t_up: list[float] = []
    t_ours: list[float] = []
    t_fast: list[float] = []
    for _ in range(args.trials):  # interleaved, so background load hits all alike
        t_up.append(_time(layer.upstream, args.iters))
        t_ours.append(_time(layer.ours, args.iters))
        t_fast.append(_time(layer.fast, args.iters))
    up_us, ours_us = statistics.median(t_up), statistics.median(t_ours)
    fast_us = statistics.median(t_fast)
    return (
        f"{tokens:>6} {requests:>5} {up_us:>12.0f} {ours_us:>9.0f} "
        f"{up_us / ours_us:>7.2f}x {fast_us:>8.0f} {up_us / fast_us:>7.2f}x {diff:>10.3g}"
    )


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vllm.lora.ops.torch_ops import lora_ops as upstream

    gen = torch.Generator().manual_seed(0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"rank {args.rank}, hidden {args.hidden}, out {args.out_dims}, {args.slots} slots, "
        f"{args.form}, median of {args.trials} x {args.iters} layer calls"
    )
    header = (
        f"{'tokens':>6} {'reqs':>5} {'upstream us':>12} {'ours us':>9} {'speedup':>8} "
        f"{'fast us':>8} {'speedup':>8} {'max|diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    for tokens in args.tokens:
        print(_row(args, tokens, gen, upstream))


if __name__ == "__main__":
    main()
