"""The PEFT + transformers reference that our server's greedy outputs must equal."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


class PeftReference:
    """float32 on both sides: there a differing token means a real bug, not rounding."""

    def __init__(self, base_dir: Path, adapters: dict[str, Path]) -> None:
        torch.set_num_threads(2)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        names = sorted(adapters)
        model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model = model.eval()
        eos = base.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def chat_prompt_ids(self, user: str) -> list[int]:
        return self.conversation_ids([{"role": "user", "content": user}])

    def conversation_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
        return ids

    @torch.inference_mode()
    def greedy(self, adapter: str | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(self.eos_ids),
            pad_token_id=min(self.eos_ids),
        )
        inputs = torch.tensor([prompt_ids])
        kwargs = {
            "input_ids": inputs,
            "attention_mask": torch.ones_like(inputs),
            "generation_config": config,
        }
        if adapter is None:
            with self.model.disable_adapter():
                out = self.model.generate(**kwargs)  # type: ignore[no-untyped-call]
        else:
            self.model.set_adapter(adapter)
            out = self.model.generate(**kwargs)  # type: ignore[no-untyped-call]
        return self.trim(out[0, len(prompt_ids) :].tolist())

    def trim(self, ids: list[int]) -> list[int]:
        """Everything before the first end-of-sequence token."""
        for i, tok in enumerate(ids):
            if tok in self.eos_ids:
                return ids[:i]
        return ids


Case = tuple[str | None, str]  # (adapter or None for the base model, user prompt)


def server_greedy_ids(
    url: str, base: str, cases: list[Case], reference: PeftReference, max_tokens: int
) -> list[list[int]]:
    """Greedy token ids from our server for every case, all sent at once so that the
    engine batches base and adapter tokens together (trimmed like the reference)."""

    def one(case: Case) -> list[int]:
        adapter, prompt = case
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=300,
            json={
                "model": base if adapter is None else f"{base}:{adapter}",
                "messages": [{"role": "user", "content": prompt}],
                "temperature": 0,
                "max_tokens": max_tokens,
                "return_token_ids": True,
            },
        )
        r.raise_for_status()
        body = r.json()
        assert body["prompt_token_ids"] == reference.chat_prompt_ids(prompt)
        return reference.trim(body["choices"][0]["token_ids"])

    with ThreadPoolExecutor(len(cases)) as pool:
        return list(pool.map(one, cases))


def mismatches(cases: list[Case], got: list[list[int]], want: list[list[int]]) -> list[str]:
    """One line per case whose tokens differ ("base / 'prompt': server [...] != peft [...]")."""
    return [
        f"{a or 'base'} / {p!r}: server {g} != peft {w}"
        for (a, p), g, w in zip(cases, got, want, strict=True)
        if g != w
    ]
