"""End-to-end engine benchmark of the CPU multi-LoRA paths, side by side in one engine.

One in-process vLLM engine (LoRA enabled, our plugin loaded) runs, round after round,
the same batches under each LoRA implementation, switched at run time:

- ``ops``: vLLM's PunicaWrapperCPU driving our fixed per-op replacements (the state
  before issue 6: correct, one matmul per active slot and per slice);
- ``fast``: our step-planned wrapper (server/engine/lora/): one plan per engine
  step, fused slices, one batched GEMM pair per layer call;
- ``upstream``: vLLM's own ops, as shipped (wrong for mixed base + adapter batches; for
  reference only).

Scenarios per round (greedy, ``ignore_eos``, fixed output length):
- ``base``: N concurrent requests, no adapter;
- ``mixed``: N concurrent requests spread over the adapters round-robin;
- ``single-base`` / ``single-lora``: one request alone (decode speed).

Rounds interleave implementations and scenarios, so background load hits all alike; the
report gives medians and ratios against ``base`` of the same implementation. The model is
the demo model, or a randomly initialised Qwen2-0.5B-shaped model (built once, cached);
adapters are random (throughput does not depend on what they say) with ranks and target
sets given on the command line. A benchmark, not a test.

    python -m loadtests micro engine --model demo --requests 16 --rounds 3
    python -m loadtests micro engine --model qwen05 --requests 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loadtests.lora_adapters import TARGET_SETS, make_random_adapter

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def make_qwen05(path: Path, tokenizer_from: Path) -> Path:
    """A randomly initialised model with Qwen2-0.5B's shapes (vocab: the demo tokenizer)."""
    if (path / "config.json").is_file():
        return path
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    config = Qwen2Config(  # type: ignore[call-arg]  # torch_dtype: still read, untyped
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=49152,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)  # type: ignore[no-untyped-call,arg-type]
    model.save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, tmp / name)
    tmp.rename(path)
    return path


def _params(path: Path, skip_embeddings: bool = False) -> int:
    """Parameters in a folder's safetensors files (headers only)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if skip_embeddings and ("embed_tokens" in name or "lm_head" in name):
                    continue
                numel = 1
                for dim in f.get_slice(name).get_shape():
                    numel *= dim
                total += numel
    return total


def _parse_adapters(spec: str) -> list[tuple[int, str]]:
    out = []
    for item in spec.split(","):
        rank, _, targets = item.partition(":")
        if targets not in TARGET_SETS:
            raise SystemExit(f"unknown target set {targets!r} in {item!r}: {sorted(TARGET_SETS)}")
        out.append((int(rank), targets))
    return out


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=None, help="LORASWAP_HOME (demo assets)")
    parser.add_argument("--model", choices=["demo", "qwen05"], default="demo")
    parser.add_argument(
        "--adapters",
        default="8:qv,16:qkvo,32:all,64:all,8:all,16:qv,32:qkvo,64:qv",
        help="rank:targets,... (targets: qv, qkvo, all) [%(default)s]",
    )
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--single-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--impls", default="ops,fast", help="comma list of ops,fast,upstream")
    parser.add_argument("--scenarios", default="base,mixed,single-base,single-lora")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=int, default=2)
    parser.add_argument("--profile", default=None, help="cProfile one round of this impl")
    parser.add_argument("--profile-scenario", default="mixed", help="the round to profile")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


@dataclass(frozen=True)
class _Inputs:
    """The model and adapters the engine serves, built (or reused) under `home`."""

    home: Path
    model_dir: Path
    adapter_dirs: list[Path]
    max_rank: int
    weight_ratio: float  # the adapters' weights over the base's non-embedding weights


def _inputs(args: argparse.Namespace) -> _Inputs:
    from server.demo import demo_assets
    from server.settings import Settings

    home = args.home or Settings().home
    assets = demo_assets(home)
    bench_dir = home / "bench"
    if args.model == "demo":
        model_dir = assets.base_dir
    else:
        model_dir = make_qwen05(bench_dir / "qwen2-0.5b-shaped", assets.base_dir)
    config = json.loads((model_dir / "config.json").read_text())
    specs = _parse_adapters(args.adapters)
    adapter_dirs = [
        make_random_adapter(
            bench_dir / f"{model_dir.name}-r{rank}-{targets}-{i}",
            config,
            rank,
            TARGET_SETS[targets],
            seed=i,
        )
        for i, (rank, targets) in enumerate(specs)
    ]
    # At decode sizes every active adapter's weights are read once per step, like the
    # base's: their ratio bounds what LoRA can cost when GEMMs are bandwidth bound.
    weight_ratio = sum(_params(p) for p in adapter_dirs) / _params(model_dir, True)
    max_rank = max(rank for rank, _ in specs)
    return _Inputs(home, model_dir, adapter_dirs, max_rank, weight_ratio)


class _Bench:
    """One in-process engine with the LoRA implementation switchable between runs."""

    def __init__(self, args: argparse.Namespace, inputs: _Inputs) -> None:
        from vllm import LLM, SamplingParams
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
        from vllm.lora.request import LoRARequest

        from server.engine.lora.patch import CpuLoraPatch

        self.llm = LLM(
            model=str(inputs.model_dir),
            dtype=args.dtype,
            max_model_len=1024,
            max_num_seqs=max(args.requests, 16),
            enable_lora=True,
            max_loras=len(inputs.adapter_dirs),
            max_cpu_loras=len(inputs.adapter_dirs),
            max_lora_rank=inputs.max_rank,
            disable_log_stats=True,
        )
        patch = CpuLoraPatch.of(PunicaWrapperCPU)
        if patch is None:
            raise SystemExit("our CPU LoRA fix is not installed in this process")
        self.patch = patch
        self.loras = [
            LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(inputs.adapter_dirs)
        ]
        self.requests = args.requests
        self.batch = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
        self.single = SamplingParams(
            temperature=0.0, max_tokens=args.single_tokens, ignore_eos=True
        )

    def use(self, impl: str) -> None:
        from server.engine.lora.patch import LoraImpl

        self.patch.use(LoraImpl(impl))

    def run(self, scenario: str) -> float:
        """One scenario's generation, in output tokens per second."""
        if scenario == "base":
            prompts, params, reqs = [PROMPT] * self.requests, self.batch, None
        elif scenario == "mixed":
            prompts, params = [PROMPT] * self.requests, self.batch
            reqs = [self.loras[i % len(self.loras)] for i in range(self.requests)]
        elif scenario == "single-base":
            prompts, params, reqs = [PROMPT], self.single, None
        else:
            prompts, params, reqs = [PROMPT], self.single, [self.loras[-1]]
        start = time.perf_counter()
        outs = self.llm.generate(prompts, params, lora_request=reqs, use_tqdm=False)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return tokens / elapsed

    def profile(self, impl: str, scenario: str) -> None:
        """cProfile one run, printed: where the time goes, and in the LoRA code."""
        import cProfile
        import pstats

        self.use(impl)
        prof = cProfile.Profile()
        prof.enable()
        self.run(scenario)
        prof.disable()
        stats = pstats.Stats(prof, stream=sys.stdout)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats("lora|sampl|logits", 25)


Results = dict[str, dict[str, list[float]]]  # impl -> scenario -> tok/s per round


def _rounds(bench: _Bench, impls: list[str], scenarios: list[str], rounds: int) -> Results:
    """Every round runs every scenario under every implementation, the order of the
    implementations reversed every other round, so background load hits all alike."""
    results: Results = {i: {s: [] for s in scenarios} for i in impls}
    for rnd in range(rounds):
        for scenario in scenarios:
            for impl in impls if rnd % 2 == 0 else reversed(impls):
                bench.use(impl)
                value = bench.run(scenario)
                results[impl][scenario].append(value)
                print(f"  {impl:>8} {scenario:<12} {value:8.1f} tok/s", file=sys.stderr, flush=True)
        print(f"round {rnd + 1}/{rounds} done", file=sys.stderr)
    return results


def _report(
    args: argparse.Namespace, inputs: _Inputs, scenarios: list[str], results: Results
) -> dict[str, dict[str, float]]:
    """Print the medians as a markdown table; answer them per implementation."""
    load = os.getloadavg()
    print(
        f"\nmodel {args.model} ({inputs.model_dir.name}), {args.dtype}, {args.requests} "
        f"requests x {args.max_tokens} tokens, adapters {args.adapters} (weights: "
        f"{inputs.weight_ratio:.0%} of the base's non-embedding weights), median of "
        f"{args.rounds} rounds, load avg {load[0]:.1f}/{load[1]:.1f}, "
        f"torch threads {torch_threads()}"
    )
    header = (
        f"| impl | {' | '.join(f'{s} tok/s' for s in scenarios)} | mixed/base | 1-lora/1-base |"
    )
    print(header)
    print("|---" * (len(scenarios) + 3) + "|")
    summary: dict[str, dict[str, float]] = {}
    for impl, runs in results.items():
        med = {s: statistics.median(v) for s, v in runs.items()}
        summary[impl] = med
        # a run without `mixed` reads 0.00x, one without `base` nan
        mixed = med.get("mixed", 0) / med["base"] if "base" in med else float("nan")
        single = _ratio(med, "single-lora", "single-base")
        cells = " | ".join(f"{med[s]:.1f}" for s in scenarios)
        print(f"| {impl} | {cells} | {mixed:.2f}x | {single:.2f}x |")
    return summary


def _ratio(medians: dict[str, float], over: str, under: str) -> float:
    """One scenario's speed over another's; nan unless both ran."""
    if over in medians and under in medians:
        return medians[over] / medians[under]
    return float("nan")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    # In-process engine core, so this process can switch the LoRA implementation.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{len(os.sched_getaffinity(0)) - 1}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

    inputs = _inputs(args)
    bench = _Bench(args, inputs)
    impls = args.impls.split(",")
    scenarios = args.scenarios.split(",")
    # warm-up: loads every adapter into its slot, primes allocator and oneDNN caches
    bench.use(impls[-1])
    warm = time.perf_counter()
    bench.run("mixed")
    bench.run("base")
    print(f"warm-up {time.perf_counter() - warm:.1f} s", file=sys.stderr, flush=True)
    if args.profile:
        bench.profile(args.profile, args.profile_scenario)
    results = _rounds(bench, impls, scenarios, args.rounds)
    bench.use("fast")
    summary = _report(args, inputs, scenarios, results)
    if args.json:
        summary["_weight_ratio"] = {"adapters/base": inputs.weight_ratio}
        run = {
            "args": vars(args) | {"home": str(inputs.home), "json": str(args.json)},
            "raw": results,
            "median": summary,
        }
        args.json.write_text(json.dumps(run, indent=2, default=str))


if __name__ == "__main__":
    main()
