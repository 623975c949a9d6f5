"""Text generation tasks (data-to-text, summarisation): the loss covers the target tokens only,
and evaluation decodes greedily and scores BLEU (sacrebleu) and ROUGE-L (rouge-score) against
every reference of a source (E2E has several references per meaning representation)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from pstar_plugins.core.inputs import IGNORE_INDEX
from pstar_plugins.errors import DataError
from pstar_plugins.tasks.template import Template


def _prompt(template: Template, tokenizer, example: dict[str, Any], pad_id: int):
    enc = template.encode(example, tokenizer, placeholder_id=pad_id, stop_at_answer=True, add_special_tokens=True)
    ids, index = enc.input_ids, enc.prompt_index
    if enc.answer_index is not None:  # the answer slot ends the prompt (drop trailing special tokens)
        ids, index = ids[:enc.answer_index], index[:enc.answer_index]
    return ids, index


def _target_ids(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def training_batch(template: Template, tokenizer, rows: list[dict], target_column: str, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded ``prompt + target`` rows; labels are the target tokens, IGNORE_INDEX elsewhere."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = []
    for number, row in enumerate(rows, start=1):
        if target_column not in row:
            raise DataError(f"row {number} has no target column {target_column!r} (columns: {sorted(row)}); set --target-column.")
        ids, index = _prompt(template, tokenizer, row, pad)
        target = _target_ids(tokenizer, str(row[target_column]))
        total = (ids + target)[:max_length]
        labels = ([IGNORE_INDEX] * len(ids) + target)[:max_length]
        seqs.append((total, (index + [-1] * len(target))[:max_length], labels))
    length = max(len(s[0]) for s in seqs)
    B = len(seqs)
    out = {
        "input_ids": torch.full((B, length), pad, dtype=torch.long),
        "attention_mask": torch.zeros(B, length, dtype=torch.long),
        "labels": torch.full((B, length), IGNORE_INDEX, dtype=torch.long),
        "prompt_index": torch.full((B, length), -1, dtype=torch.long),
    }
    for i, (ids, index, labels) in enumerate(seqs):
        n = len(ids)
        out["input_ids"][i, :n] = torch.tensor(ids)
        out["attention_mask"][i, :n] = 1
        out["labels"][i, :n] = torch.tensor(labels)
        out["prompt_index"][i, :n] = torch.tensor(index)
    if not (out["prompt_index"] >= 0).any():
        del out["prompt_index"]
    return out


def group_references(rows: list[dict], template: Template, target_column: str) -> list[tuple[dict, list[str]]]:
    """One entry per distinct source (the template's fields), with all its references."""
    groups: OrderedDict[tuple, tuple[dict, list[str]]] = OrderedDict()
    for row in rows:
        key = tuple(str(row.get(f)) for f in template.fields)
        groups.setdefault(key, (row, []))[1].append(str(row[target_column]).strip())
    return list(groups.values())


@torch.no_grad()
def generate(model, template: Template, tokenizer, sources: list[dict], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy decoding from left-padded prompts; returns the decoded continuations."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(sources), batch_size):
        prompts = [_prompt(template, tokenizer, row, pad) for row in sources[start:start + batch_size]]
        length = max(len(p[0]) for p in prompts)
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        index = torch.full_like(ids, -1)
        for i, (p, idx) in enumerate(prompts):
            ids[i, length - len(p):] = torch.tensor(p)
            mask[i, length - len(p):] = 1
            index[i, length - len(p):] = torch.tensor(idx)
        kwargs = {"prompt_index": index.to(device)} if (index >= 0).any() else {}
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **kwargs)
        for row in out[:, length:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
    return outputs


def bleu_rouge(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU over all references (sacrebleu) and mean best-reference ROUGE-L F1."""
    import sacrebleu
    from rouge_score import rouge_scorer

    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs) for hyp, refs in zip(hypotheses, references))
    return {"bleu": bleu, "rouge_l": 100 * rouge / max(1, len(hypotheses))}
