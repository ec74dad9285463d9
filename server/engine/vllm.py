"""The one module that imports vLLM: the in-process async engine, and our vLLM plugin.

Requests reach it through vLLM's OpenAI layer (server/engine/openai_layer.py); here is
the engine's start, adapter residency and health.
"""

from __future__ import annotations

import importlib
import logging
import os
from argparse import Namespace
from types import ModuleType
from typing import Any

from server.engine.base import LoraHandle
from server.errors import EngineFailure, EngineUnavailable
from server.settings import EngineSettings

log = logging.getLogger("loraswap.engine")

# -- the vLLM plugin: our CPU multi-LoRA fix (server/engine/lora/) ------------------
#
# vLLM calls `register_plugin` (entry point `vllm.general_plugins`) in every one of its
# processes, possibly several times, so it is idempotent and cheap after the first call:
# what it did is recorded on the vLLM class it patched (CpuLoraPatch.of). On the CPU
# platform, unless LORASWAP_LORA_FIX is 0/false/off/no, it swaps vLLM's CPU punica LoRA
# ops for ours while a probe says the installed vLLM still has the -1 bug, and wraps
# `_get_lora_device` so LoRA works on int8 W8A8 layers whose `weight` is None.

LORA_FIX_ENV = "LORASWAP_LORA_FIX"
# The step-planned fast path of server/engine/lora/ (on top of the op fix).
LORA_FAST_ENV = "LORASWAP_LORA_FAST"
_DISABLED_VALUES = frozenset({"0", "false", "off", "no"})

# Every module that holds `_get_lora_device` by name in vLLM 0.32.0: the defining one
# and its two `from .utils import _get_lora_device` importers.
_DEVICE_FIX_MODULES = (
    "vllm.lora.layers.utils",
    "vllm.lora.layers.base_linear",
    "vllm.lora.layers.fused_moe",
)

lora_fix_log = logging.getLogger("loraswap.lora_fix")


def _enabled(env: str, default: str) -> bool:
    return os.environ.get(env, default).strip().lower() not in _DISABLED_VALUES


def register_plugin() -> None:
    """Entry point of `vllm.general_plugins`: install the CPU LoRA fix where it applies."""
    if not _enabled(LORA_FIX_ENV, "auto"):
        return

    from vllm.platforms import current_platform

    if not current_platform.is_cpu():  # CUDA/ROCm/XPU use kernels that skip -1
        return

    import vllm.lora.ops.torch_ops as torch_ops
    import vllm.lora.ops.torch_ops.lora_ops as torch_lora_ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from server.engine.lora.patch import CpuLoraPatch

    if CpuLoraPatch.of(punica_cpu.PunicaWrapperCPU) is not None:
        return  # decided once per process: neither the env nor the platform changes
    fix_ops = _ops_need_fix(punica_cpu, torch_lora_ops)
    patch = CpuLoraPatch.install(
        punica_cpu.PunicaWrapperCPU,
        punica_cpu,
        fix_ops=fix_ops,
        fast=_enabled(LORA_FAST_ENV, "1"),
        op_modules=[torch_ops, torch_lora_ops],
        device_modules=_device_fix_modules(),
    )
    if patch.patched:
        lora_fix_log.info(
            "CPU LoRA fix (pid %d%s): patched %s",
            os.getpid(),
            "" if fix_ops else ", upstream ops already correct",
            _summary(patch.patched),
        )


def _device_fix_modules() -> list[ModuleType]:
    modules: list[ModuleType] = []
    for name in _DEVICE_FIX_MODULES:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:  # a later vLLM moved it; the others still get the fix
            lora_fix_log.debug("LoRA device fix: %s not importable", name)
    return modules


def _ops_need_fix(punica_cpu: ModuleType, torch_lora_ops: ModuleType) -> bool:
    """Whether vLLM's CPU ops still have the -1 bug (or ours are already bound)."""
    from server.engine.lora import ops

    if ops.is_ours(vars(punica_cpu).get("bgmv_shrink")):
        # Already installed in this process (e.g. by a re-imported copy of this module).
        return True
    try:
        return ops.upstream_bug_present(torch_lora_ops.bgmv_shrink)
    except Exception:
        # The op no longer takes 0.32.0-style arguments: ours would be mis-called too.
        lora_fix_log.warning(
            "CPU LoRA ops: probe of vLLM's bgmv_shrink failed; leaving the ops as they are",
            exc_info=True,
        )
        return False


def _summary(patched: list[str]) -> str:
    """Group "module.name" entries per module (module.{x,y}) for one readable log line."""
    by_module: dict[str, list[str]] = {}
    for entry in patched:
        target, _, note = entry.partition(" ")
        module, _, name = target.rpartition(".")
        by_module.setdefault(module, []).append(f"{name} {note}" if note else name)
    return "; ".join(
        f"{module}.{names[0]}" if len(names) == 1 else f"{module}.{{{','.join(names)}}}"
        for module, names in by_module.items()
    )


def _configure_env(settings: EngineSettings) -> None:
    # vLLM reads these at import / engine start; set them before either, and never
    # override what the operator exported explicitly.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    if settings.cpu_threads_bind == "auto":
        cores = len(os.sched_getaffinity(0))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}")
    else:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_threads_bind
    os.environ[LORA_FIX_ENV] = "1" if settings.lora_fix else "0"
    os.environ[LORA_FAST_ENV] = "1" if settings.lora_fast else "0"
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")


class VllmEngine:
    """vLLM's in-process AsyncLLM, started from the same argument parser as `vllm serve`
    (server/engine/openai_layer.py builds the arguments), so engine and OpenAI layer read
    one set of options."""

    def __init__(self, llm: Any, args: Namespace) -> None:
        self._llm = llm
        self.args = args

    @classmethod
    def start(cls, args: Namespace, settings: EngineSettings) -> VllmEngine:
        _configure_env(settings)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(AsyncEngineArgs.from_cli_args(args))
        return cls(llm, args)

    @property
    def engine_client(self) -> Any:
        return self._llm

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    async def add_lora(self, lora: LoraHandle) -> None:
        try:
            ok = await self._llm.add_lora(lora_request(lora))
        except Exception as exc:
            raise self._failure(f"the engine could not load adapter {lora.name!r}") from exc
        if not ok:
            raise EngineFailure(f"the engine could not load adapter {lora.name!r}")

    async def remove_lora(self, lora_id: int) -> None:
        try:
            await self._llm.remove_lora(lora_id)
        except Exception as exc:
            raise self._failure(f"the engine could not remove LoRA id {lora_id}") from exc

    async def pin_lora(self, lora_id: int) -> None:
        try:
            await self._llm.pin_lora(lora_id)
        except Exception as exc:
            raise self._failure(f"the engine could not pin LoRA id {lora_id}") from exc

    def _failure(self, message: str) -> EngineFailure | EngineUnavailable:
        """A dead engine is a 503 (go elsewhere), anything else a 500 (a bug of ours)."""
        if self._llm.errored:
            return EngineUnavailable("the inference engine is not running")
        return EngineFailure(message)

    async def check_health(self) -> None:
        if self._llm.errored:
            raise EngineUnavailable("the inference engine is not running")
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineUnavailable("the inference engine is not running") from exc

    async def num_running(self) -> int:
        return int(self._llm.get_num_unfinished_requests())

    def shutdown(self) -> None:
        self._llm.shutdown()


def lora_request(lora: LoraHandle) -> Any:
    """vLLM's LoRARequest for one of our adapter versions (its name carries the content
    digest: vLLM's caches, the prefix cache among them, key on it)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=lora.engine_name, lora_int_id=lora.lora_id, lora_path=lora.path)


def gpu_build() -> bool:
    """Whether this vLLM runs on GPUs (its platform as detected in this process): Ray
    replicas then each take `tensor_parallel_size` GPUs."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()
