"""Patching vLLM's CPU LoRA path: where our ops, the device fix and the fast path are bound.

punica_cpu does ``from vllm.lora.ops.torch_ops import bgmv_shrink, ...``, so patching the
defining module alone would not reach it: `bind_fixes` swaps the ops in wherever vLLM
bound them by name, and wraps ``_get_lora_device`` in the defining module and in every
importer of it. `CpuLoraPatch` does the whole job for one ``PunicaWrapperCPU`` class and
is the one record of it: what was patched, the originals, and which implementation is
active. It lives on the class it patched (`CpuLoraPatch.of`), so a process has one such
record and nothing of it sits in module globals of ours.

This module never imports vLLM (project rule: only ``server/engine/vllm.py`` does); the
plugin hook there imports the vLLM modules and hands them over.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from enum import Enum
from types import ModuleType
from typing import Any

from server.engine.lora import wrapper
from server.engine.lora.device import LoraDeviceFn, make_lora_device_fix
from server.engine.lora.ops import OPS

__all__ = ["CpuLoraPatch", "LoraImpl", "bind_fixes"]


class LoraImpl(str, Enum):
    """The CPU LoRA paths a patched process can switch between (`CpuLoraPatch.use`)."""

    FAST = "fast"  # the step-planned wrapper (server/engine/lora/wrapper.py) over our ops
    OPS = "ops"  # vLLM's PunicaWrapperCPU over our fixed per-op replacements
    UPSTREAM = "upstream"  # vLLM's own ops, as shipped (wrong for mixed batches)

    @classmethod
    def _missing_(cls, value: object) -> LoraImpl:
        raise ValueError(f"unknown LoRA implementation {value!r}")


# --------------------------------------------------------------------------- binding


def _same_parameters(a: Callable[..., object], b: Callable[..., object]) -> bool:
    try:
        return list(inspect.signature(a).parameters) == list(inspect.signature(b).parameters)
    except (TypeError, ValueError):  # no introspectable signature: do not guess
        return False


def _bind_ops(modules: Iterable[ModuleType]) -> list[str]:
    done: list[str] = []
    for module in modules:
        for name, ours in OPS.items():
            current: object = getattr(module, name, None)
            if current is None or current is ours:
                continue
            where = f"{module.__name__}.{name}"
            if not callable(current) or not _same_parameters(current, ours):
                done.append(f"{where} (skipped: signature differs from vLLM 0.32.0)")
                continue
            setattr(module, name, ours)
            done.append(where)
    return done


def _bind_device_fix(modules: Iterable[ModuleType]) -> list[str]:
    done: list[str] = []
    # original -> its wrapper, so every importer of one original gets the same wrapper
    wrappers: dict[LoraDeviceFn, LoraDeviceFn] = {}
    for module in modules:
        current: object = getattr(module, "_get_lora_device", None)
        if current is None or not callable(current):
            continue
        fixed = wrappers.get(current)
        if fixed is None:
            fixed = wrappers[current] = make_lora_device_fix(current)
        if fixed is current:  # already one of ours
            continue
        module._get_lora_device = fixed  # type: ignore[attr-defined]
        done.append(f"{module.__name__}._get_lora_device")
    return done


def bind_fixes(
    punica_cpu_module: ModuleType | None,
    device_fix_modules: Iterable[ModuleType] = (),
    *,
    extra_op_modules: Iterable[ModuleType] = (),
) -> list[str]:
    """Bind our ops and the tolerant ``_get_lora_device`` where vLLM bound the originals.

    punica_cpu_module: ``vllm.lora.punica_wrapper.punica_cpu``, whose methods call the
        ops through its module globals (it did ``from vllm.lora.ops.torch_ops import
        ...``). None: leave the ops alone and apply only the device fix (upstream ops
        already correct).
    device_fix_modules: modules with a module-level ``_get_lora_device`` to wrap: the
        defining ``vllm.lora.layers.utils`` and every importer of it by name
        (``vllm.lora.layers.base_linear``, ``vllm.lora.layers.fused_moe`` in 0.32.0).
    extra_op_modules: further namespaces holding the ops by name (e.g.
        ``vllm.lora.ops.torch_ops`` and its ``lora_ops``) so later importers get ours;
        ignored when punica_cpu_module is None.

    An op is only replaced if its parameter names are those of ours (vLLM 0.32.0's), so
    a changed upstream signature is skipped and reported, not mis-called. Returns one
    line per binding changed or skipped, e.g. ``"vllm.lora.punica_wrapper.punica_cpu.
    bgmv_shrink"``. Idempotent: a second call changes nothing; it returns [] unless
    some binding was skipped (skips are reported on every call).
    """
    done: list[str] = []
    if punica_cpu_module is not None:
        done += _bind_ops([punica_cpu_module, *extra_op_modules])
    done += _bind_device_fix(device_fix_modules)
    return done


# --------------------------------------------------------------------------- the patch


class CpuLoraPatch:
    """Our changes to one vLLM ``PunicaWrapperCPU`` class and its module, and their record.

    wrapper_cls / module: the patched class and the module whose globals hold the ops it
        calls; upstream_ops: those ops as vLLM bound them before the patch;
    originals: the class's own methods the fast path replaced (None: no fast path);
    patched: one line per binding changed or skipped (for the log);
    impl: the implementation running now.
    """

    def __init__(self, wrapper_cls: type[Any], punica_module: ModuleType) -> None:
        """Take note of what vLLM has bound; change nothing yet."""
        self.wrapper_cls = wrapper_cls
        self.module = punica_module
        self.upstream_ops: dict[str, Callable[..., Any]] = {
            name: getattr(punica_module, name) for name in OPS
        }
        self.originals: wrapper.WrapperMethods | None = None
        self.patched: list[str] = []
        self.impl = LoraImpl.UPSTREAM

    @classmethod
    def of(cls, wrapper_cls: type[Any]) -> CpuLoraPatch | None:
        """The patch installed on this class, if any."""
        found = vars(wrapper_cls).get(wrapper.PATCH_ATTR)
        return found if isinstance(found, cls) else None

    @classmethod
    def install(
        cls,
        wrapper_cls: type[Any],
        punica_module: ModuleType,
        *,
        fix_ops: bool,
        fast: bool,
        op_modules: Iterable[ModuleType] = (),
        device_modules: Iterable[ModuleType] = (),
    ) -> CpuLoraPatch:
        """Patch vLLM's CPU LoRA path once per class (a second call returns the first patch).

        fix_ops: replace the ops (the probe found upstream's bug); fast: on top of that,
        bind the step-planned methods of server/engine/lora/wrapper.py; op_modules,
        device_modules: as `bind_fixes`'s extra_op_modules and device_fix_modules.
        """
        found = cls.of(wrapper_cls)
        if found is not None:
            return found
        patch = cls(wrapper_cls, punica_module)
        patch.patched = bind_fixes(
            punica_module if fix_ops else None, device_modules, extra_op_modules=op_modules
        )
        if fix_ops:
            patch.impl = LoraImpl.OPS
            if fast:
                patch._install_fast()
        setattr(wrapper_cls, wrapper.PATCH_ATTR, patch)
        return patch

    def _install_fast(self) -> None:
        cls = self.wrapper_cls
        self.originals = wrapper.WrapperMethods(
            add_lora_linear=vars(cls)["add_lora_linear"],
            add_lora_logits=vars(cls).get("add_lora_logits"),
            update_metadata=cls.update_metadata,  # PunicaWrapperBase's
        )
        cls.update_metadata = wrapper.make_update_metadata(self.originals.update_metadata)
        self.use(LoraImpl.FAST)
        self.patched.append(
            f"{cls.__name__}.{{add_lora_linear,add_lora_logits,update_metadata}} (fast path)"
        )

    def use(self, impl: LoraImpl) -> None:
        """Switch the CPU LoRA path at run time, for side-by-side benchmarks in one engine
        (loadtests/bench_engine.py). The server runs FAST, or OPS with the fast path off."""
        originals = self.originals
        if originals is None:
            raise RuntimeError("the fast LoRA path is not installed in this process")
        cls = self.wrapper_cls
        fast = impl is LoraImpl.FAST
        cls.add_lora_linear = wrapper.add_lora_linear if fast else originals.add_lora_linear
        if originals.add_lora_logits is not None:
            cls.add_lora_logits = wrapper.add_lora_logits if fast else originals.add_lora_logits
        ops = self.upstream_ops if impl is LoraImpl.UPSTREAM else OPS
        for name, fn in ops.items():
            setattr(self.module, name, fn)
        self.impl = impl
