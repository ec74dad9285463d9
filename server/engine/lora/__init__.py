"""Our CPU multi-LoRA path for vLLM 0.32: the -1-index fix, the device fix, the fast path.

Kernels (pure functions over tensors, no vLLM):

- `kernels`: the per-op math: runs of rows sharing an adapter slot, three strategies;
- `ops`: the six punica ops with vLLM 0.32.0's signatures, on top of `kernels`, and the
  probe for upstream's bug;
- `device`: a ``_get_lora_device`` that tolerates layers whose ``weight`` is None;
- `plan`, `pack`, `apply`: the fast path: one plan per engine step, one pack per layer
  and adapter load, a few GEMMs per layer call.

Glue to vLLM (still without importing it; ``server/engine/vllm.py`` hands the modules in):

- `wrapper`: the fast path's methods for vLLM's ``PunicaWrapperCPU``;
- `patch`: `CpuLoraPatch`, which binds all of the above into vLLM and records what it
  changed; `LoraImpl` names the paths a benchmark can switch between.
"""
