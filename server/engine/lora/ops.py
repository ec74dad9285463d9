"""Correct and faster replacements for vLLM 0.32.0's six CPU (pure torch) punica LoRA ops.

vLLM's CPU LoRA path (`vllm/lora/punica_wrapper/punica_cpu.py`) calls the six ops of
`vllm/lora/ops/torch_ops/lora_ops.py`. Each of them gathers the per-token adapter
weights with ``weights[lora_indices]``. A token that has no adapter (a base-model
request, or padding) carries index -1, which the Triton/CUDA kernels skip but which in
torch is ordinary negative indexing: such a token gets the LAST adapter slot applied.
So a base-model request batched next to LoRA requests silently answers with whatever
adapter happens to sit in slot ``max_loras - 1``. The same gather also materialises a
``[tokens, out, in]`` weight copy per call, which makes prefill slow.

The ops below keep vLLM 0.32.0's signatures and in-place semantics exactly (argument
names and order, assignment for shrink, ``add_inputs`` for expand, ``scaling``, slice
offsets, the sgmv segment arguments, computing in the output dtype) but a negative index
means "no LoRA": the row behaves as if its adapter weights were zero (an accumulating op
leaves it untouched, an assigning op writes zeros). The math is in
`server.engine.lora.kernels`; `upstream_bug_present` is the probe that tells whether the
installed vLLM still needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import torch

from server.engine.lora.kernels import (
    Run,
    dispatch,
    runs_from_indices,
    runs_from_segments,
    stacked_3d,
)

__all__ = [
    "OPS",
    "bgmv_expand",
    "bgmv_expand_slice",
    "bgmv_shrink",
    "is_ours",
    "sgmv_expand",
    "sgmv_expand_slice",
    "sgmv_shrink",
    "upstream_bug_present",
]


def _check_indices(inputs: torch.Tensor, lora_indices_tensor: torch.Tensor) -> None:
    if lora_indices_tensor.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"bgmv: {lora_indices_tensor.shape[0]} indices for {inputs.shape[0]} input rows"
        )


def _shrink(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output_tensor: torch.Tensor,
    runs: list[Run],
    scaling: float,
) -> None:
    out = output_tensor[:, : weights.shape[1]]
    dispatch(inputs, weights, out, runs, scaling, accumulate=False, truncate=False)


def _expand(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output_tensor: torch.Tensor,
    runs: list[Run],
    add_inputs: bool,
) -> None:
    # Adapter and model may pad the output dimension differently: only the common
    # columns are computed and written (upstream computes all and drops the rest).
    common = min(weights.shape[1], output_tensor.shape[1])
    dispatch(
        inputs,
        weights[:, :common],
        output_tensor[:, :common],
        runs,
        1.0,
        accumulate=add_inputs,
        truncate=True,
    )


def _slice_of(
    weights: torch.Tensor, output_tensor: torch.Tensor, slice_offset: int, slice_size: int
) -> torch.Tensor:
    out = output_tensor[:, slice_offset : slice_offset + slice_size]
    if out.shape[1] != weights.shape[1]:
        raise ValueError(
            f"expand_slice: slice of width {out.shape[1]} for LoRA output {weights.shape[1]}"
        )
    return out


# --------------------------------------------------------------------------- the ops
# Names, parameter names/order and defaults are vLLM 0.32.0's (even bgmv_shrink's
# `lora_b_weights`), so callers passing keywords keep working and the patch
# (server/engine/lora/patch.py) can check the signatures it replaces.


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    """``output_tensor[t, :rank] = scaling * inputs[t] @ W[idx[t]].T`` (zeros for idx -1)."""
    _check_indices(inputs, lora_indices_tensor)
    weights = stacked_3d(lora_b_weights)
    _shrink(inputs, weights, output_tensor, runs_from_indices(lora_indices_tensor), scaling)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    """``output_tensor[t, :n] (+)= inputs[t] @ W[idx[t]].T`` over the common width n."""
    _check_indices(inputs, lora_indices_tensor)
    weights = stacked_3d(lora_b_weights)
    _expand(inputs, weights, output_tensor, runs_from_indices(lora_indices_tensor), add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    """``output_tensor[t, off:off+size] (+)= inputs[t] @ W[idx[t]].T``."""
    _check_indices(inputs, lora_indices_tensor)
    weights = stacked_3d(lora_b_weights)
    out = _slice_of(weights, output_tensor, slice_offset, slice_size)
    runs = runs_from_indices(lora_indices_tensor)
    dispatch(inputs, weights, out, runs, 1.0, accumulate=add_inputs, truncate=False)


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    """Segment form of `bgmv_shrink`: segment i is seq_len[i] rows using lora_indices[i].

    b_seq_start_loc, batches, max_seq_length and token_nums are accepted for signature
    compatibility and, as upstream, not used (the segments are back to back from row 0).
    """
    weights = stacked_3d(lora_a_weights)
    runs = runs_from_segments(seq_len_tensor, lora_indices_tensor, inputs.shape[0])
    _shrink(inputs, weights, output_tensor, runs, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    """Segment form of `bgmv_expand` (same unused arguments as `sgmv_shrink`)."""
    weights = stacked_3d(lora_b_weights)
    runs = runs_from_segments(seq_len_tensor, lora_indices_tensor, inputs.shape[0])
    _expand(inputs, weights, output_tensor, runs, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    """Segment form of `bgmv_expand_slice` (same unused arguments as `sgmv_shrink`)."""
    weights = stacked_3d(lora_b_weights)
    out = _slice_of(weights, output_tensor, slice_offset, slice_size)
    runs = runs_from_segments(seq_len_tensor, lora_indices_tensor, inputs.shape[0])
    dispatch(inputs, weights, out, runs, 1.0, accumulate=add_inputs, truncate=False)


OPS: Final[dict[str, Callable[..., None]]] = {
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "bgmv_shrink": bgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
}


def is_ours(fn: object) -> bool:
    """True if `fn` is one of the replacement ops of this module."""
    return any(fn is op for op in OPS.values())


def upstream_bug_present(bgmv_shrink: Callable[..., object]) -> bool:
    """Whether the given shrink op gives a token with index -1 a LoRA contribution.

    Two tokens over two adapter slots; token 0 uses slot 0, token 1 has no adapter
    (-1). A correct op leaves row 1 of the output at zero; the buggy upstream op applies
    the last slot (all ones here) and writes a nonzero row. Exceptions from the op
    propagate: an op that cannot run this 0.32.0-style call is not one we should
    replace with 0.32.0-style ops either.
    """
    hidden, rank = 4, 2
    inputs = torch.ones(2, hidden, dtype=torch.float32)
    weights = torch.ones(2, 1, rank, hidden, dtype=torch.float32)
    indices = torch.tensor([0, -1], dtype=torch.long)
    output = torch.zeros(2, rank, dtype=torch.float32)
    bgmv_shrink(inputs, weights, output, indices, 1.0)
    return bool(output[1].abs().sum().item() != 0.0)
