"""A tolerant ``_get_lora_device``, so LoRA works on CPU int8 W8A8 layers.

vLLM's CPU int8 W8A8 kernels (compressed-tensors, oneDNN path) prepack the weight and
then set ``layer.weight = None``, after which vLLM's ``_get_lora_device``
(vllm/lora/layers/utils.py) dies with ``'NoneType' object has no attribute 'device'``
as soon as LoRA is enabled. `make_lora_device_fix` wraps it; the patch
(server/engine/lora/patch.py) binds the wrapper where vLLM holds the original.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final

import torch

__all__ = ["LoraDeviceFn", "is_device_fix", "lora_device", "make_lora_device_fix"]

LoraDeviceFn = Callable[[torch.nn.Module], torch.device]

# Where vLLM's _get_lora_device looks, in its order; dotted = nested attribute.
_DEVICE_ATTRS: Final = (
    "weight",
    "weight_packed",
    "qweight",
    "ark_linear.qweight",
    "w2_weight",
    "w2_weight_packed",
    "w2_qweight",
)

# Set on every wrapper, so a second patch recognises (and skips) what is already wrapped.
_MARK: Final = "_loraswap_device_fix"


def lora_device(base_layer: torch.nn.Module) -> torch.device:
    """Device for a layer's LoRA tensors, tolerating attributes that are None.

    Same lookup order as vLLM's ``_get_lora_device`` but an attribute that exists and
    is None (the CPU W8A8 int8 kernels drop ``weight`` after prepacking it) is skipped
    instead of dereferenced; failing every known name, the first parameter, then the
    first buffer of the layer decides.
    """
    layer: torch.nn.Module = getattr(base_layer, "routed_experts", base_layer)
    for path in _DEVICE_ATTRS:
        value: object = layer
        for name in path.split("."):
            value = getattr(value, name, None)
        if isinstance(value, torch.Tensor):
            return value.device
    for module in (layer, base_layer):
        for param in module.parameters():
            return param.device
        for buf in module.buffers():
            return buf.device
    raise ValueError(f"Unsupported base layer: {base_layer}")


def is_device_fix(fn: object) -> bool:
    """True if `fn` is a wrapper made by `make_lora_device_fix`."""
    return getattr(fn, _MARK, False) is True


def make_lora_device_fix(original: LoraDeviceFn) -> LoraDeviceFn:
    """Wrap vLLM's ``_get_lora_device``: its answer when it has one, else `lora_device`.

    Wrapping rather than replacing keeps upstream's behaviour (and any layer types a
    later vLLM learns about) for every layer it handles; only the AttributeError of a
    None attribute falls through to the tolerant lookup. A wrapper given back is
    returned as it is (never wrapped twice).
    """
    if is_device_fix(original):
        return original

    @functools.wraps(original)
    def _get_lora_device(base_layer: torch.nn.Module) -> torch.device:
        try:
            return original(base_layer)
        except AttributeError:
            return lora_device(base_layer)

    setattr(_get_lora_device, _MARK, True)
    return _get_lora_device
