"""Prompt tuning: a table of ``(num_tasks, m, hidden)`` prompts, one row per task.

Rows of a batch can use different tasks' prompts in the same forward (``task_ids``), which is
what makes prompt tuning servable as one frozen model for many tasks (Lester et al. §1).

Serving from the prompts' cache: in a causal decoder the virtual tokens come first and see only
each other, so their keys and values in every layer depend on the prompt alone. At inference
(no gradient, ``packing`` on) each distinct prompt of the batch is run once, its per-layer
keys/values are captured, and the user's tokens run without virtual positions, attending to
those keys/values as a prefix (``mechanisms.attention``) at the positions they would have had after
the prompt. Same outputs as ``[P; E]`` (tested); ``m`` fewer positions per row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pstar_plugins.contract.capabilities import OnePassContinuations, PeftExport, PromptCache
from pstar_plugins.contract.errors import AdapterError, ConfigError, IncompatibleModelError
from pstar_plugins.contract.method import PeftPrompt
from pstar_plugins.mechanisms import fast_paths, packing
from pstar_plugins.mechanisms.attention import SELF, PrefixInjector
from pstar_plugins.mechanisms.base_calls import call_base
from pstar_plugins.mechanisms.distributed import embedding_rows, embedding_shape, embedding_std
from pstar_plugins.mechanisms.inputs import first_real_index, positions_from_mask
from pstar_plugins.methods.embedding_prompt import EmbeddingPromptMethod
from pstar_plugins.methods.prompt_tuning.config import PromptTuningConfig

_SERVING_INJECTOR = "_serving_injector"
# what serving from the prompts' cache stands in for: the cache path runs only where these are
# PromptTuning's own (``virtual_block`` is called by it, so overriding that is fine)
_CACHE_STANDS_IN_FOR = ("run", "insertion_index", "fill_slots", "_embed", "_prediction_index")


def _text_ids(tokenizer, text: str) -> list[int]:
    if tokenizer is None:
        raise ConfigError(
            "this initialisation reads text: pass tokenizer= to build_model (or --model with a tokenizer)."
        )
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


class PromptTuning(EmbeddingPromptMethod, OnePassContinuations, PeftExport, PromptCache):
    """Inserts ``prompt[task]`` (``(m, hidden)``) before the input embeddings (encoder side for
    encoder-decoder models), or right after BOS with ``position='after_bos'``.

    Outputs line up with the user's tokens: logits are ``(B, L, vocab)`` for ``L`` input tokens.
    """

    one_pass_continuations = True  # see OnePassContinuations

    def __init__(self, config: PromptTuningConfig, base_model: nn.Module, tokenizer=None) -> None:
        super().__init__(config)
        embedding = base_model.get_input_embeddings()
        rows = [initial_prompt(config, embedding, tokenizer) for _ in range(config.num_tasks)]
        device = embedding.weight.device
        self.prompt = nn.Parameter(torch.stack(rows).to(device=device, dtype=torch.float32))  # (T, m, hidden)

    # -- PEFT's PROMPT_TUNING (and a folded P_TUNING, which is the same tensor) -------------
    def peft_export(self, base_model):
        if self.config.num_tasks != 1 or self.config.position != "start":
            raise AdapterError(
                "PEFT prompt tuning has one prompt in front of the input: export needs num_tasks=1 and "
                "position='start'."
            )
        return PeftPrompt(
            "PROMPT_TUNING",
            self.prompt.detach()[0],
            {
                **self.peft_embedding_config(base_model),
                "prompt_tuning_init": "RANDOM",
                "prompt_tuning_init_text": None,
                "tokenizer_name_or_path": None,
            },
        )

    @classmethod
    def peft_options(cls, peft_config):
        return {"num_virtual_tokens": int(peft_config["num_virtual_tokens"]), "init": "random"}

    def state_from_peft(self, base_model, embeddings):
        return {"prompt": embeddings.reshape(1, embeddings.shape[0], -1)}

    def virtual_block(self, batch, task_ids):
        return self.prompt[:1] if task_ids is None else self.prompt[task_ids.to(self.prompt.device)]

    def insertion_index(self, input_ids, mask):
        if self.config.position == "start":
            return super().insertion_index(input_ids, mask)
        # after the first real token (BOS): left padding puts it at a different index in each row
        return first_real_index(mask) + 1

    # -- serving from the prompts' cache -----------------------------------------------------
    def run(self, base_model, inputs, task_ids):
        if self._prompt_cache_reason(base_model, inputs) is None:
            packing.record_prompt_cache()
            return self._run_from_prompt_cache(base_model, inputs, task_ids)
        return super().run(base_model, inputs, task_ids)

    def _prompt_cache_reason(self, base_model: nn.Module, inputs: dict[str, Any]) -> str | None:
        """Why this call keeps the virtual tokens in the sequence, or ``None`` when the prompts'
        keys/values can stand in for them: the model's record (``fast_paths.of``, which asked
        :meth:`prompt_cache_reason` once), then what this call passes."""
        if not self.packing:
            return "packing is off"
        if not self.contributing:
            return "the method is disabled"
        decided = fast_paths.of(base_model, self).prompt_cache
        if decided is not None:
            return decided
        if torch.is_grad_enabled():
            return "training (the prompt's gradient flows through its positions)"
        if inputs.get("position_ids") is not None:
            return "the caller passes position_ids"
        if inputs.get("input_ids") is None:
            return "no input_ids"
        if inputs.get("labels") is not None:
            # in [P; E] the last virtual token predicts a left-padded row's first token, and the
            # model's loss counts that prediction; without virtual positions there is none
            return "labels are passed"
        if packing.uses_cache(inputs):
            return "a KV cache is in use"
        if self._injector(base_model) is None:  # probed on the first call that gets this far
            return "the model's attention cannot take a prefix"
        return None

    def prompt_cache_reason(self, base_model: nn.Module) -> str | None:
        """What this method and config say about serving from the prompts' cache on
        ``base_model`` (the model's family, sliding windows and ZeRO-3 are the record's)."""
        overridden = [
            name for name in _CACHE_STANDS_IN_FOR if getattr(type(self), name) is not getattr(PromptTuning, name)
        ]
        if overridden:
            # the cache path re-implements what these compute; a subclass that changes them keeps
            # the virtual tokens in the sequence, where its own code runs
            return f"{type(self).__name__} overrides {', '.join(overridden)}"
        if self.config.position != "start":
            return f"position={self.config.position!r} (the prompt is not first)"
        return None

    def _injector(self, base_model: nn.Module) -> PrefixInjector | None:
        # a plain attribute (not a submodule, not saved); serving from the cache changes no
        # adapter geometry (adapter_geometry stays the default: no attention sites)
        if _SERVING_INJECTOR not in self.__dict__:
            try:
                self.__dict__[_SERVING_INJECTOR] = PrefixInjector(base_model)
            except IncompatibleModelError:
                self.__dict__[_SERVING_INJECTOR] = None
        return self.__dict__[_SERVING_INJECTOR]

    def prompt_keys_values(self, base_model: nn.Module, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's keys and values for ``prompts`` ``(N, m, hidden)`` run alone from position
        0: ``(N, n_layers, n_kv, m, head_dim)`` each."""
        injector = self._injector(base_model)
        N, m = prompts.shape[:2]
        backbone = base_model.base_model
        device = prompts.device
        with injector.capture() as captured:
            backbone(
                inputs_embeds=prompts.to(base_model.get_input_embeddings().weight.dtype),
                attention_mask=torch.ones(N, m, dtype=torch.long, device=device),
                position_ids=torch.arange(m, device=device).expand(N, m),
                use_cache=False,
            )
        sites = sorted(index for kind, index in captured if kind == SELF)
        keys = torch.stack([captured[(SELF, i)][0] for i in sites], 1)
        values = torch.stack([captured[(SELF, i)][1] for i in sites], 1)
        return keys, values

    def _run_from_prompt_cache(self, base_model, inputs, task_ids):
        input_ids = inputs["input_ids"]
        task_ids = self.check_task_ids(task_ids, input_ids.shape[0])
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = inputs["attention_mask"] = torch.ones_like(input_ids)
        # the positions the user's tokens have behind the prompt in [P; E]
        inputs["position_ids"] = positions_from_mask(mask) + self.config.num_virtual_tokens * (mask > 0).long()

        def prefixes_of(tasks):
            # through the overridable API: a subclass's prompt (residual MLP, ...) is what is cached
            prompts = self.virtual_block(1 if tasks is None else len(tasks), tasks)
            return {SELF: self.prompt_keys_values(base_model, prompts)}

        with self.__dict__[_SERVING_INJECTOR].activate_tasks(task_ids, prefixes_of) as while_packed:
            return call_base(self, base_model, inputs, while_packed=while_packed)

    def detach(self, base_model) -> None:
        injector = self.__dict__.pop(_SERVING_INJECTOR, None)
        if injector is not None:
            injector.detach()
