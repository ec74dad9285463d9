"""loadtests/profile.py: py-spy's raw stacks into categories, innermost frame first."""

from __future__ import annotations

from loadtests.profile import OTHER, categorize, parse_raw


def test_the_innermost_frame_decides() -> None:
    lora = [
        "execute_model (vllm/v1/worker/cpu_model_runner.py:10)",
        "apply (vllm/lora/layers/base_linear.py:90)",
        "add_lora_linear (server/engine/lora/wrapper.py:160)",
        "apply_lora (server/engine/lora/apply.py:40)",
    ]
    assert categorize(lora) == "LoRA math (fast path: apply.py)"
    base_gemm_in_a_lora_layer = [*lora[:2], "apply (vllm/model_executor/layers/linear.py:200)"]
    assert categorize(base_gemm_in_a_lora_layer) == "base GEMMs (linear layers)"
    packing = [*lora[:3], "build_pack (server/engine/lora/pack.py:180)"]
    assert categorize(packing) == "LoRA weights copied out / stacked (pack.py)"
    assert categorize(["<module> (foo.py:1)"]) == OTHER


def test_parse_raw_sums_counts_and_skips_process_and_thread_frames() -> None:
    text = "\n".join(
        [
            'process 12:"python";thread (0x1);run (server/engine/lora/plan.py:3) 7',
            "thread (0x1);apply_lora (server/engine/lora/apply.py:40) 5",
            "thread (0x1);apply_lora (server/engine/lora/apply.py:41) 2",
            "garbage line",
        ]
    )
    counts = parse_raw(text)
    assert counts == {"LoRA step plan (plan.py)": 7, "LoRA math (fast path: apply.py)": 7}
