"""Prompt tuning: a table of ``(num_tasks, m, hidden)`` prompts, one row per task.

Rows of a batch can use different tasks' prompts in the same forward (``task_ids``), which is
what makes prompt tuning servable as one frozen model for many tasks (Lester et al. §1).
"""

from __future__ import annotations

import torch
from torch import nn

from pstar_plugins.core.distributed import embedding_rows, embedding_shape, embedding_std
from pstar_plugins.core.embedding_prompt import EmbeddingPromptMethod
from pstar_plugins.core.inputs import first_real_index
from pstar_plugins.errors import ConfigError
from pstar_plugins.methods.prompt_tuning.config import PromptTuningConfig


def _text_ids(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ConfigError("this initialisation reads text: pass tokenizer= to build_model (or --model with a tokenizer).")
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _vocab_ids(n: int, vocab_size: int, sample_size: int, tokenizer, generator) -> torch.Tensor:
    special = set(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else set()
    pool = torch.tensor([i for i in range(min(sample_size, vocab_size)) if i not in special])
    return pool[torch.randint(len(pool), (n,), generator=generator)]


def initial_prompt(config: PromptTuningConfig, embedding: nn.Module, tokenizer, generator=None) -> torch.Tensor:
    """One ``(m, hidden)`` fp32 prompt initialised as ``config.init`` says."""
    m = config.num_virtual_tokens
    vocab_size, hidden = embedding_shape(embedding)
    if config.init == "random":
        std = embedding_std(embedding)
        return torch.randn(m, hidden, generator=generator) * std
    rows: list[torch.Tensor] = []
    if config.init == "text":
        ids = _text_ids(tokenizer, config.init_text)
        ids = (ids * (m // len(ids) + 1))[:m]  # repeat the text to fill m positions
        return embedding_rows(embedding, torch.tensor(ids)).cpu()
    if config.init == "labels":
        for word in config.label_words[:m]:
            ids = _text_ids(tokenizer, " " + word.strip()) or _text_ids(tokenizer, word)
            rows.append(embedding_rows(embedding, torch.tensor(ids)).mean(0).cpu())
    rest = m - len(rows)
    if rest:
        ids = _vocab_ids(rest, vocab_size, config.vocab_sample_size, tokenizer, generator)
        rows.extend(embedding_rows(embedding, ids).cpu())
    return torch.stack(rows)


class PromptTuning(EmbeddingPromptMethod):
    """Inserts ``prompt[task]`` (``(m, hidden)``) before the input embeddings (encoder side for
    encoder-decoder models), or right after BOS with ``position='after_bos'``.

    Outputs line up with the user's tokens: logits are ``(B, L, vocab)`` for ``L`` input tokens.
    """

    def __init__(self, config: PromptTuningConfig, base_model: nn.Module, tokenizer=None) -> None:
        super().__init__(config)
        embedding = base_model.get_input_embeddings()
        rows = [initial_prompt(config, embedding, tokenizer) for _ in range(config.num_tasks)]
        device = embedding.weight.device
        self.prompt = nn.Parameter(torch.stack(rows).to(device=device, dtype=torch.float32))  # (T, m, hidden)
        self.bos_token_id = getattr(base_model.config, "bos_token_id", None)

    def virtual_block(self, batch, task_ids):
        return self.prompt[:1] if task_ids is None else self.prompt[task_ids.to(self.prompt.device)]

    def insertion_index(self, input_ids, mask):
        if self.config.position == "start":
            return super().insertion_index(input_ids, mask)
        # after the first real token (BOS): left padding puts it at a different index in each row
        return first_real_index(mask) + 1
