"""A tiny Qwen2.5-VL that has learned the layout experiment's language: the MLLM every arm shares, frozen.

Why: the paper's premise is an MLLM that reads text (Qwen2.5-VL, trained on text and grounding data). A
random tiny one cannot: its canvas tokens take a near-constant average of the prompt (measured: 0.3% of the
canvas variance is across prompts), so neither conditioning path gets a plan. This gives the toy world a
language model of its own, in the real architecture and on-disk format:

- tokenizer: a byte-level BPE trained on the toy language, so each word is one token, as in Qwen's vocabulary;
- model: the same tiny Qwen2.5-VL (`tiny.write_tiny_qwen`), trained by next-token prediction on a text-only
  grounding task. The user turn is a prompt, the answer lists the scene cell by cell in reading order
  ("top left: red circle; center: blue square"): to answer, the model must bind each object to its
  position words, the skill Qwen2.5-VL's grounding data teaches. No image and no canvas take part.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def answer_of(scene, cells: tuple[str, ...]) -> str:
    """The grounding answer: occupied cells in reading order, each with its object."""
    by_cell = {cell: f"{colour} {shape}" for shape, colour, cell in scene}
    names = [c.split(" the ")[-1] for c in cells]  # "at the top left" -> "top left"
    return "; ".join(f"{names[k]}: {by_cell[k]}" for k in sorted(by_cell))


def _chat(prompt: str, answer: str) -> str:
    """The Qwen chat format of one grounding exchange (the planner's user turn, then the answer).

    Written out rather than rendered by the tokenizer: the tokenizer is trained on these texts.
    """
    return f"{SYSTEM}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def _encode(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of each exchange and a mask of its answer tokens (the loss is on those only)."""
    out = []
    for prompt, ans in pairs:
        text = _chat(prompt, ans)
        ids = tokenizer(text).input_ids
        head = len(tokenizer(text.rsplit(ans, 1)[0]).input_ids)
        out.append((ids, [0] * head + [1] * (len(ids) - head)))
    return out


def _batch(encoded: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and answer mask of encoded exchanges."""
    n = max(len(ids) for ids, _ in encoded)
    x = torch.tensor([ids + [pad] * (n - len(ids)) for ids, _ in encoded])
    mask = torch.tensor([[1] * len(ids) + [0] * (n - len(ids)) for ids, _ in encoded])
    target = torch.tensor([answer + [0] * (n - len(answer)) for _, answer in encoded])
    return x, mask, target


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(ids.shape[1])[None, None].expand(3, ids.shape[0], -1)  # text only: 1-D positions
    model.model.rope_deltas = None
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits


def grounding_accuracy(model, tokenizer, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Teacher-forced: the share of answer tokens predicted right, and of answers with every token right."""
    with torch.no_grad():
        ids, mask, target = _batch(_encode(tokenizer, pairs), tokenizer.pad_token_id)
        pred = _logits(model, ids, mask)[:, :-1].argmax(-1)
        t = target[:, 1:].bool()
        right = (pred == ids[:, 1:]) | ~t
    return {"token": float(right[t].float().mean()), "exact": float(right.all(1).float().mean())}


def write_language_mllm(
    folder: Path,
    scenes: list,
    test_scenes: list,
    cells: tuple[str, ...],
    prompt_of,
    seed: int = 0,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 3e-3,
) -> dict:
    """Write the tiny Qwen2.5-VL to `folder`, trained on `scenes` (grounding), and return its accuracy.

    `test_scenes` are only measured, never trained on.
    """
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from metacanvas_core.tiny import write_tiny_qwen

    pairs = [(prompt_of(s), answer_of(s, cells)) for s in scenes]
    test = [(prompt_of(s), answer_of(s, cells)) for s in test_scenes]
    corpus = [_chat(p, a) for p, a in pairs[:2000]]
    write_tiny_qwen(folder, seed=seed, corpus=corpus, vocab_size=400)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder).train()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoded = _encode(tokenizer, pairs)  # once: the training loop only samples and pads
    params = [p for n, p in model.named_parameters() if "visual" not in n]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, min(100, steps // 10))  # then linear decay to 5%
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * max(0.05, 1 - i / max(steps, 1))
    )
    losses = []
    for _ in range(steps):
        ids, mask, target = _batch(rng.sample(encoded, batch_size), tokenizer.pad_token_id)
        logits = _logits(model, ids, mask)[:, :-1]
        t = target[:, 1:].bool()
        loss = F.cross_entropy(logits[t].float(), ids[:, 1:][t])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    report = {
        "steps": steps,
        "final_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
        "train": grounding_accuracy(model, tokenizer, pairs[:256]),
        "test": grounding_accuracy(model, tokenizer, test),
        "tokens_per_prompt": sum(len(tokenizer(p).input_ids) for p, _ in test) / len(test),
    }
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "grounding.json").write_text(json.dumps(report, indent=1))
    return report
