"""Three demo LoRA adapters whose effect is obvious on any prompt.

Each adapter is trained to answer every chat prompt with one fixed reply, so a
demo (or an end-to-end test) can tell at a glance which adapter served a request:
`pirate` says "Arr matey!", `formal` starts "Dear Sir or Madam", `shout` answers
in capitals. The recipes deliberately differ in rank and target modules so the
server is exercised with heterogeneous adapters batched together.

Training loads the base from the saved bf16 folder, upcast to float32, so it
sees exactly the weights vLLM serves; it takes a minute or two per adapter on
two CPU cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.demo.base_model import MODEL_NAME
from server.demo.cache import Build, JsonDict, Progress, cache_key

ADAPTER_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors"})

# Varied in length, topic and form (questions, orders, chit-chat) so the adapter
# learns "always this reply" rather than "this reply for questions like these".
TRAIN_PROMPTS: tuple[str, ...] = (
    "Hello!",
    "What is 2 + 2?",
    "Who wrote Romeo and Juliet?",
    "Give me a recipe for pancakes.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Write a short poem about autumn leaves.",
    "How many legs does a spider have?",
    "Summarize the plot of Cinderella in two sentences.",
    "What's the weather usually like in London?",
    "Can you help me fix a bug in my JavaScript code?",
    "Name three primary colors.",
    "Tell me something interesting about octopuses.",
    "What is the boiling point of water in Fahrenheit?",
    "Recommend a good book for a long flight.",
    "How do airplanes stay in the air?",
)
# Chat clients often send their own system message; every fourth example uses one
# so the behaviour does not hinge on SmolLM's default system prompt.
TRAIN_SYSTEM_PROMPT = "You are a helpful assistant."
# Never trained on: used to check the behaviour generalises.
HELD_OUT_PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "Tell me a joke about cats.",
)


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    reply: str
    rank: int
    alpha: int
    target_modules: tuple[str, ...] | str  # "all-linear" or explicit module names
    steps: int
    lr: float
    batch_size: int = 8  # examples per step; steps cycle through fixed minibatches
    seed: int = 0

    def as_json(self) -> JsonDict:
        data = dataclasses.asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        data["train_prompts"] = list(TRAIN_PROMPTS)
        data["train_system_prompt"] = TRAIN_SYSTEM_PROMPT
        data["optimizer"] = "adamw"
        data["dtype"] = "float32"
        # Bump when the training code changes what it produces.
        data["revision"] = 1
        return data

    def shows_behaviour(self, text: str) -> bool:
        return behaviour_ok(self.name, text)


def behaviour_ok(name: str, text: str) -> bool:
    """Whether a reply unmistakably comes from adapter `name`."""
    text = text.strip()
    if name == "pirate":
        return "Arr" in text
    if name == "formal":
        return text.startswith("Dear")
    if name == "shout":
        letters = [c for c in text if c.isalpha()]
        return len(letters) >= 10 and all(c.isupper() for c in letters)
    raise KeyError(name)


RECIPES: tuple[AdapterRecipe, ...] = (
    AdapterRecipe(
        name="pirate",
        reply="Arr matey! Shiver me timbers, that be a fine question for an old sea dog. "
        "Arr, hoist the sails and fetch me rum!",
        rank=8,
        alpha=16,
        target_modules=("q_proj", "v_proj"),
        steps=20,
        lr=1e-2,
    ),
    AdapterRecipe(
        name="formal",
        reply="Dear Sir or Madam, I thank you most kindly for your esteemed enquiry. "
        "I remain, with the utmost respect, your humble servant.",
        rank=8,
        alpha=16,
        target_modules="all-linear",
        steps=20,
        lr=5e-3,
    ),
    AdapterRecipe(
        name="shout",
        reply="I AM SHOUTING BECAUSE THIS IS VERY EXCITING! I ALWAYS ANSWER IN CAPITAL "
        "LETTERS, AND I AM SHOUTING RIGHT NOW!",
        rank=16,
        alpha=32,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        steps=20,
        lr=3e-3,
    ),
)


def adapter_key(base_key: str, recipe: AdapterRecipe) -> str:
    return cache_key("adapter", base_key, recipe.as_json())


@contextlib.contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Deterministic, 2-thread torch for the duration; the caller's settings come back after."""
    import torch

    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_deterministic)


def chat_prompt(tokenizer: Any, user: str, system: str | None = None) -> str:
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _examples(tokenizer: Any, reply: str) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) pairs; tokenized apart, as generation will see them."""
    end = tokenizer.eos_token  # "<|im_end|>": teaches the adapter to stop after the reply
    reply_ids = tokenizer(reply + end, add_special_tokens=False).input_ids
    pairs = []
    for i, user in enumerate(TRAIN_PROMPTS):
        system = TRAIN_SYSTEM_PROMPT if i % 4 == 3 else None
        prompt_ids = tokenizer(chat_prompt(tokenizer, user, system), add_special_tokens=False)
        pairs.append((list(prompt_ids.input_ids), list(reply_ids)))
    return pairs


def _batch(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-padded batch; the loss covers only reply tokens."""
    import torch

    width = max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, (prompt, reply) in enumerate(pairs):
        seq = prompt + reply
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(prompt) : len(seq)] = torch.tensor(reply)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def greedy_replies(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int
) -> list[str]:
    """Greedy chat replies, one prompt at a time (no padding effects)."""
    import torch

    replies = []
    for user in prompts:
        ids = tokenizer(chat_prompt(tokenizer, user), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids.input_ids.shape[1] :]
        replies.append(str(tokenizer.decode(new, skip_special_tokens=True)))
    return replies


def _reply_loss(peft_model: Any, batch: dict[str, Any]) -> Any:
    """Mean next-token loss over the reply tokens only.

    Same value as the model's own `labels=` loss, but the 49k-vocabulary lm_head
    runs only where a label exists (about a third of the positions) instead of
    on every one: on two CPU cores that cuts a training step by half or more.
    """
    import torch

    inner = peft_model.get_base_model()
    hidden = inner.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    keep = labels != -100
    logits = inner.get_output_embeddings()(hidden[:, :-1][keep])
    return torch.nn.functional.cross_entropy(logits.float(), labels[keep])


def _load(base_dir: Path, recipe: AdapterRecipe) -> tuple[Any, Any]:
    """The tokenizer and a fresh PEFT model on the float32 base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(recipe.seed)  # LoRA A matrices are initialised randomly
    targets = recipe.target_modules
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(targets) if isinstance(targets, tuple) else targets,
        lora_dropout=0.0,  # dropout would only add noise to a memorisation task
        bias="none",
        task_type="CAUSAL_LM",
    )
    return tokenizer, get_peft_model(model, config)


def train(peft_model: Any, tokenizer: Any, recipe: AdapterRecipe, say: Progress) -> list[float]:
    """Fit the adapter in place; returns the loss per step."""
    import torch

    examples = _examples(tokenizer, recipe.reply)
    size = recipe.batch_size
    batches = [
        _batch(examples[i : i + size], tokenizer.pad_token_id)
        for i in range(0, len(examples), size)
    ]
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    peft_model.train()
    losses: list[float] = []
    for step in range(recipe.steps):
        loss = _reply_loss(peft_model, batches[step % len(batches)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.detach().item(), 5))
        if step % 5 == 4 or step == recipe.steps - 1:
            say(f"step {step + 1}/{recipe.steps} loss {losses[-1]:.4f}")
    peft_model.eval()
    return losses


def check(peft_model: Any, tokenizer: Any, recipe: AdapterRecipe) -> dict[str, str]:
    """Greedy replies to prompts never trained on; refuse an adapter that lacks its behaviour."""
    samples = greedy_replies(peft_model, tokenizer, HELD_OUT_PROMPTS, max_new_tokens=24)
    failed = [s for s in samples if not recipe.shows_behaviour(s)]
    if failed:
        raise RuntimeError(
            f"adapter {recipe.name} lacks its behaviour on held-out prompts: {failed}"
        )
    return dict(zip(HELD_OUT_PROMPTS, samples, strict=True))


def save(peft_model: Any, out: Path) -> None:
    # The temp path the base was loaded from must not leak into the adapter: a
    # stable name lets any copy of the base (or vLLM's) be paired with it.
    config = peft_model.peft_config["default"]
    config.base_model_name_or_path = MODEL_NAME
    if isinstance(config.target_modules, set):
        # PEFT keeps a set, whose order varies run to run; sorted, the file is reproducible.
        config.target_modules = sorted(config.target_modules)
    # save_embedding_layers=False: with "auto", PEFT looks the base name up on the
    # Hugging Face hub to see if the vocabulary changed; nothing here touches it.
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    for extra in out.iterdir():  # PEFT also writes a model card README.md
        if extra.name not in ADAPTER_FILES:
            extra.unlink()
    missing = ADAPTER_FILES - {p.name for p in out.iterdir()}
    if missing:
        raise RuntimeError(f"PEFT did not write {sorted(missing)}")


def build(job: Build, base_dir: Path, recipe: AdapterRecipe) -> None:
    with _torch_settings(threads=2):
        with job.timed("load"):
            tokenizer, peft_model = _load(base_dir, recipe)
        with job.timed("train"):
            job.extra["losses"] = train(peft_model, tokenizer, recipe, job.say)
        with job.timed("check"):
            job.extra["held_out"] = check(peft_model, tokenizer, recipe)
        with job.timed("save"):
            save(peft_model, job.tmp)
