"""A quantized copy of the demo base, in the compressed-tensors format vLLM reads.

Round-to-nearest needs no calibration data, so this runs fully offline in a few
seconds. The shipped scheme is int8 W8A8: weights int8 per output channel,
symmetric; input activations quantized per token at run time (nothing stored).
On CPU it is the fastest quantized path in vLLM (oneDNN int8 GEMM). Only the
decoder's Linear layers are quantized: the embedding is tied to lm_head, and
quantizing lm_head would also change the shared embedding.

W4A16 (pack-quantized, group 128) is kept as an alternative recipe: it loads in
vLLM CPU with LoRA without any fix, but runs slower than bf16 there.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from server.demo.base_model import SMOKE_PROMPT
from server.demo.cache import MANIFEST_NAME, Build, JsonDict, cache_key

# compressed-tensors preset -> (on-disk format vLLM dispatches on, weight group size).
# W4A16's preset groups by 128, which does not divide this model's hidden size
# (576 = 9 x 64), so it is grouped by 64 here.
SCHEMES: dict[str, tuple[str, int | None]] = {
    "W8A8": ("int-quantized", None),
    "W4A16": ("pack-quantized", 64),
}
SCHEME = "W8A8"
DIR_NAME = f"smollm2-135m-instruct-{SCHEME.lower()}"
IGNORE = ("lm_head",)

RECIPE: JsonDict = {
    "method": "round-to-nearest",
    "scheme": SCHEME,
    "format": SCHEMES[SCHEME][0],
    "group_size": SCHEMES[SCHEME][1],
    "targets": ["Linear"],
    "ignore": list(IGNORE),
    "scale_dtype": "float32",
    # Bump when the quantization code changes what it writes.
    "revision": 1,
}

# Weight files are rewritten; everything else (tokenizer, chat template,
# generation config) is copied so the folder is servable on its own.
_NOT_COPIED = frozenset({"model.safetensors", "config.json", MANIFEST_NAME})


def quantized_key(base_key: str) -> str:
    return cache_key("quantized", base_key, RECIPE)


def _rtn_qparams(weight: Any, args: Any) -> tuple[Any, Any]:
    """Min/max scales and zero points straight from the weight (no calibration)."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    w = weight.detach().float()  # scales computed in fp32, not in the bf16 of the weights
    if args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    elif args.strategy == QuantizationStrategy.GROUP:
        grouped = w.unflatten(-1, (-1, args.group_size))
        lo, hi = grouped.amin(dim=-1), grouped.amax(dim=-1)
    else:
        raise ValueError(f"round-to-nearest here supports channel/group weights, not {args}")
    scale, zero_point = calculate_qparams(lo, hi, args)
    return scale, zero_point


def quantize_model(model: Any, scheme_name: str) -> Any:
    """Quantize `model` in place and return the compressor that knows its config."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    fmt, group_size = SCHEMES[scheme_name]
    scheme = preset_name_to_scheme(scheme_name, ["Linear"])
    if group_size is not None and scheme.weights is not None:
        scheme.weights = scheme.weights.model_copy(update={"group_size": group_size})
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(IGNORE), format=fmt)
    # Attaches the scheme and empty scale/zero-point parameters to each target.
    apply_quantization_config(model, config)
    count = 0
    for _name, module in model.named_modules():
        module_scheme = getattr(module, "quantization_scheme", None)
        if module_scheme is None or module_scheme.weights is None:
            continue
        scale, zero_point = _rtn_qparams(module.weight, module_scheme.weights)
        # fp32 scales: bf16 would add up to 0.4% error per channel on top of int8's.
        module.weight_scale = torch.nn.Parameter(scale.float(), requires_grad=False)
        zp = module.weight_zero_point
        module.weight_zero_point = torch.nn.Parameter(zero_point.to(zp.dtype), requires_grad=False)
        count += 1
    if count == 0:
        raise RuntimeError("no Linear layer matched the quantization config")
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    return compressor


# Teacher-forced texts for comparing the quantized model with its base.
_AGREEMENT_CHATS = (
    ("What is the capital of France?", "The capital of France is Paris."),
    (
        "Give me three tips for staying healthy.",
        "1. Eat a balanced diet with plenty of fruits and vegetables. 2. Exercise "
        "regularly. 3. Get enough sleep every night.",
    ),
)
# Least share of next-token predictions that must match the bf16 base. Measured:
# RTN W8A8 ~0.90, W4A16 (group 64) ~0.66 on this model; a broken scale layout
# or a transposed weight lands near 0.
MIN_AGREEMENT = {"W8A8": 0.75, "W4A16": 0.5}


def _check_tensors(folder: Path, scheme_name: str) -> int:
    """The on-disk layout vLLM's compressed-tensors loader expects."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
        scales = [n for n in names if n.endswith(".weight_scale")]
        if scheme_name == "W8A8":
            bad = [n for n in scales if f.get_slice(n[: -len("_scale")]).get_dtype() != "I8"]
            if bad:
                raise RuntimeError(f"non-int8 quantized weights: {bad[:3]}")
    if not scales or any("embed_tokens" in n or "lm_head" in n for n in scales):
        raise RuntimeError("unexpected set of quantized tensors")
    return len(scales)


def verify(folder: Path, base_dir: Path, scheme_name: str = SCHEME) -> JsonDict:
    """Check the tensors, then compare next-token predictions with the base.

    transformers reads compressed-tensors checkpoints itself (an independent
    reader from the code that wrote it). A greedy answer is recorded but not
    asserted: per-token int8 activations flip near-tied tokens on a 135M model,
    so the wording may drift while the model is fine.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    layers = _check_tensors(folder, scheme_name)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    quantized: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    same = total = 0
    for user, reply in _AGREEMENT_CHATS:
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            agree = base(ids).logits.argmax(-1) == quantized(ids).logits.argmax(-1)
        same += int(agree.sum())
        total += agree.numel()
    agreement = same / total
    if agreement < MIN_AGREEMENT[scheme_name]:
        raise RuntimeError(f"quantized model agrees with its base on only {agreement:.0%}")

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": SMOKE_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = quantized.generate(ids, max_new_tokens=24, do_sample=False)
    reply_text = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return {
        "quantized_layers": layers,
        "top1_agreement_with_base": round(agreement, 4),
        "smoke": {"prompt": SMOKE_PROMPT, "greedy_reply": reply_text},
    }


def build(job: Build, base_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    with job.timed("quantize"):
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)
        compressor = quantize_model(model, SCHEME)
        model.save_pretrained(str(job.tmp))
        # Writes `quantization_config` into config.json: vLLM picks its kernels from it.
        compressor.update_config(str(job.tmp))
        for item in base_dir.iterdir():
            if item.is_file() and item.name not in _NOT_COPIED:
                shutil.copy2(item, job.tmp / item.name)
    with job.timed("verify"):
        job.extra.update(verify(job.tmp, base_dir))
