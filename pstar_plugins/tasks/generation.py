"""Text generation tasks (data-to-text, summarisation): the loss covers the target tokens only,
and evaluation decodes greedily and scores BLEU (sacrebleu) and ROUGE-L (rouge-score) against
every reference of a source (E2E has several references per meaning representation)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch.nn import functional as F

from pstar_plugins.assembly.model import slot_input_of
from pstar_plugins.contract.errors import DataError
from pstar_plugins.mechanisms.inputs import IGNORE_INDEX
from pstar_plugins.mechanisms.template import SLOT_PAD, TEMPLATE_SLOTS, Template, bind_slots


def _prompt(template: Template, tokenizer, example: dict[str, Any], pad_id: int):
    enc = template.encode(example, tokenizer, placeholder_id=pad_id, stop_at_answer=True, add_special_tokens=True)
    ids, index = enc.input_ids, enc.slots
    if enc.answer_index is not None:  # the answer slot ends the prompt (drop trailing special tokens)
        ids, index = ids[: enc.answer_index], index[: enc.answer_index]
    return ids, index


def _target_ids(tokenizer, text: str) -> list[int]:
    ids = list(tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def training_batch(
    template: Template, tokenizer, rows: list[dict], target_column: str, max_length: int
) -> dict[str, torch.Tensor]:
    """``prompt + target`` rows with the labels on the target tokens only (IGNORE_INDEX elsewhere).

    Prompts are left-padded and targets right-padded, so every row's target starts at the same
    column: the loss then needs logits for the last ``target width + 1`` columns only
    (:func:`target_token_loss`), never for the prompt, the padding or virtual tokens.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = []
    for number, row in enumerate(rows, start=1):
        if target_column not in row:
            raise DataError(
                f"row {number} has no target column {target_column!r} (columns: {sorted(row)}); set --target-column."
            )
        ids, index = _prompt(template, tokenizer, row, pad)
        target = _target_ids(tokenizer, str(row[target_column]))
        if len(ids) >= max_length:  # keep the prompt's end (next to the target) and one target token
            ids, index = ids[len(ids) - max_length + 1 :], index[len(index) - max_length + 1 :]
        target = target[: max_length - len(ids)]
        seqs.append((ids, index, target))
    prompt_width = max(len(s[0]) for s in seqs)
    length = prompt_width + max(len(s[2]) for s in seqs)
    B = len(seqs)
    out = {
        "input_ids": torch.full((B, length), pad, dtype=torch.long),
        "attention_mask": torch.zeros(B, length, dtype=torch.long),
        "labels": torch.full((B, length), IGNORE_INDEX, dtype=torch.long),
        TEMPLATE_SLOTS: torch.full((B, length), SLOT_PAD, dtype=torch.long),
    }
    for i, (ids, index, target) in enumerate(seqs):
        start, end = prompt_width - len(ids), prompt_width + len(target)
        out["input_ids"][i, start:end] = torch.tensor(ids + target)
        out["attention_mask"][i, start:end] = 1
        out["labels"][i, prompt_width:end] = torch.tensor(target, dtype=torch.long)
        out[TEMPLATE_SLOTS][i, start:prompt_width] = torch.tensor(index, dtype=torch.long)
    if not (out[TEMPLATE_SLOTS] != SLOT_PAD).any():
        del out[TEMPLATE_SLOTS]
    return out


def target_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of a :func:`training_batch` (decoder-only models).

    Only the columns that predict a target token get logits (``logits_to_keep``): the LM head and
    the softmax over the vocabulary never run at prompt, padding or virtual positions. Equal to
    the model's own loss with ``labels`` (tested).
    """
    labels = batch["labels"]
    inputs = bind_slots({k: v for k, v in batch.items() if k != "labels"}, slot_input_of(model))
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if labelled.numel() == 0:
        raise DataError("no row of this batch has a target token; check --target-column and --max-length.")
    first = max(int(labelled[0]), 1)  # a label on column 0 has no column before it to predict it
    keep = labels.shape[1] - first + 1  # the column before the first target predicts it
    logits = model(**inputs, logits_to_keep=keep).logits[:, -keep:-1]
    targets = labels[:, first:].to(logits.device)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def group_references(rows: list[dict], template: Template, target_column: str) -> list[tuple[dict, list[str]]]:
    """One entry per distinct source (the template's fields), with all its references."""
    groups: OrderedDict[tuple, tuple[dict, list[str]]] = OrderedDict()
    for number, row in enumerate(rows, start=1):
        if target_column not in row:
            raise DataError(
                f"evaluation row {number} has no target column {target_column!r} (columns: {sorted(row)}); "
                "set --target-column."
            )
        key = tuple(str(row.get(f)) for f in template.fields)
        groups.setdefault(key, (row, []))[1].append(str(row[target_column]).strip())
    return list(groups.values())


@torch.no_grad()
def generate(
    model,
    template: Template,
    tokenizer,
    sources: list[dict],
    max_new_tokens: int,
    batch_size: int,
    progress=None,
    synced_gpus: bool = False,
) -> list[str]:
    """Greedy decoding from left-padded prompts; returns the decoded continuations (``progress``:
    a tqdm bar advanced by the rows of each batch; ``synced_gpus``: keep stepping until every rank
    is done, as ZeRO-3 needs)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(sources), batch_size):
        prompts = [_prompt(template, tokenizer, row, pad) for row in sources[start : start + batch_size]]
        length = max(len(p[0]) for p in prompts)
        ids = torch.full((len(prompts), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        index = torch.full_like(ids, SLOT_PAD)
        for i, (p, idx) in enumerate(prompts):
            ids[i, length - len(p) :] = torch.tensor(p)
            mask[i, length - len(p) :] = 1
            index[i, length - len(p) :] = torch.tensor(idx)
        kwargs = bind_slots(
            {TEMPLATE_SLOTS: index.to(device)} if (index != SLOT_PAD).any() else {}, slot_input_of(model)
        )
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            **({"synced_gpus": True} if synced_gpus else {}),
            **kwargs,
        )
        for row in out[:, length:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip().split("\n")[0].strip())
        if progress is not None:
            progress.update(len(prompts))
    return outputs


def generate_and_score(
    model,
    template: Template,
    tokenizer,
    groups: list[tuple[dict, list[str]]],
    max_new_tokens: int,
    batch_size: int,
    progress=None,
) -> tuple[dict[str, float], list[str]]:
    """Greedy continuations of each source of :func:`group_references` and their BLEU / ROUGE-L."""
    hyps = generate(model, template, tokenizer, [g[0] for g in groups], max_new_tokens, batch_size, progress)
    return bleu_rouge(hyps, [g[1] for g in groups]), hyps


def bleu_rouge(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU over all references (sacrebleu) and mean best-reference ROUGE-L F1."""
    import sacrebleu
    from rouge_score import rouge_scorer

    width = max(len(r) for r in references)
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(
        max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in refs) for hyp, refs in zip(hypotheses, references)
    )
    return {"bleu": bleu, "rouge_l": 100 * rouge / max(1, len(hypotheses))}
