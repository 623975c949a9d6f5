"""Prefix tuning: independent prefixes per kind of attention site.

Decoder-only and encoder-only models have one kind (``self``). Encoder-decoder models get three
independent prefixes, as in Li & Liang 2021 §4.2: encoder self-attention, decoder
self-attention and cross-attention (PEFT gives the encoder none, peft#491).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from pstar_plugins.contract.capabilities import CheckpointContext, OnePassContinuations, PeftExport
from pstar_plugins.contract.errors import AdapterError, ConfigError, IncompatibleModelError
from pstar_plugins.contract.method import PeftPrompt, PromptMethod
from pstar_plugins.mechanisms.attention import PrefixInjector
from pstar_plugins.mechanisms.base_calls import call_base, generate_base
from pstar_plugins.mechanisms.geometry import attention_geometry, hidden_size
from pstar_plugins.mechanisms.inputs import fill_position_ids, is_encoder_decoder
from pstar_plugins.mechanisms.rotary import rotate_keys
from pstar_plugins.methods.prefix_tuning.config import PrefixTuningConfig
from pstar_plugins.methods.prefix_tuning.table import PrefixTable


def _declared_layers(config, kind: str) -> int | None:
    try:
        return attention_geometry(config, kind).n_layers
    except IncompatibleModelError:
        return None


class PrefixTuning(PromptMethod, OnePassContinuations, PeftExport, CheckpointContext):
    """``tables[kind]`` holds ``(T, m, ...)`` prefixes for every site of that kind.

    ``layers`` (used by P-tuning v2) restricts prefixes to a subset of layer indices.
    """

    one_pass_continuations = True  # see OnePassContinuations

    def __init__(
        self, config: PrefixTuningConfig, base_model: nn.Module, layers: list[int] | None = None, tokenizer=None
    ) -> None:
        super().__init__(config)
        injector = PrefixInjector(base_model)
        self.__dict__["injector"] = injector  # plain attribute: not a submodule, not saved
        device = next(base_model.parameters()).device
        input_size = config.projection_input_size or hidden_size(base_model.config)
        tables = {}
        try:
            observed = injector.geometry()
        except IncompatibleModelError:
            injector.detach()
            raise
        for kind, count in injector.counts().items():
            declared = _declared_layers(base_model.config, kind)
            if declared is not None and declared != count:
                injector.detach()
                raise IncompatibleModelError(
                    f"the config of {type(base_model).__name__} (model_type {base_model.config.model_type!r}) declares "
                    f"{declared} {kind} attention layers but {count} called transformers' attention interface; "
                    "prefix methods would leave layers without a prefix. Use prompt-tuning or p-tuning instead."
                )
            geometry = observed[kind]
            rows = list(range(count)) if layers is None else sorted({i if i >= 0 else count + i for i in layers})
            bad = [i for i in rows if not 0 <= i < count]
            if bad:
                injector.detach()
                raise IncompatibleModelError(
                    f"layers {bad} do not exist: the model has {count} {kind} layers (0..{count - 1})."
                )
            injector.layer_map[kind] = [rows.index(i) if i in rows else None for i in range(count)]
            sub = type(geometry)(len(rows), geometry.n_kv_heads, geometry.head_dim, geometry.value_dim)
            tables[kind] = PrefixTable(
                sub,
                config.num_tasks,
                config.num_virtual_tokens,
                config.projection,
                input_size,
                config.projection_hidden_size,
                config.init_std,
                device,
            )
        self.tables = nn.ModuleDict(tables)
        self.dropout = nn.Dropout(config.prefix_dropout)
        if config.init == "text":
            try:
                self._init_from_text(base_model, tokenizer)
            except Exception:
                injector.detach()
                raise

    @torch.no_grad()
    def _init_from_text(self, base_model: nn.Module, tokenizer) -> None:
        """Start from the keys/values the frozen model computes for ``init_text`` (repeated or cut
        to ``m`` tokens): Li & Liang 2021 §7.2 found initialising with real words' activations
        much better than random in low-data settings. The prefix then equals the KV cache of the
        text, so the first step behaves as if the text were prepended."""
        if tokenizer is None:
            raise ConfigError("init='text' needs the tokenizer: pass tokenizer= to build_model.")
        m = self.config.num_virtual_tokens
        ids = list(tokenizer(self.config.init_text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ConfigError(f"init_text={self.config.init_text!r} has no tokens; give it some words.")
        ids = (ids * (m // len(ids) + 1))[:m]
        device = next(base_model.parameters()).device
        ids = torch.tensor([ids], device=device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if is_encoder_decoder(base_model):
            inputs["decoder_input_ids"] = ids
        training = base_model.training
        base_model.eval()  # no dropout in the activations we keep
        try:
            from pstar_plugins.mechanisms.distributed import gathered_module_by_module

            with self.injector.capture() as captured, gathered_module_by_module(base_model):
                base_model(**inputs)
        finally:
            base_model.train(training)
        for kind, table in self.tables.items():
            rows = [i for i, row in enumerate(self.injector.layer_map[kind]) if row is not None]
            keys = torch.stack([captured[(kind, i)][0][0] for i in rows])  # (n_layers, n_kv, m, d)
            values = torch.stack([captured[(kind, i)][1][0] for i in rows])
            table.prefix.copy_(table.join(keys, values)[None].expand_as(table.prefix).float())

    @property
    def folded(self) -> bool:
        return all(t.folded for t in self.tables.values())

    def fold(self) -> None:
        for table in self.tables.values():
            table.fold()

    def prefixes(self, task_ids: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Compute every kind's prefix once for this call (the MLP runs once per forward); none
        while the method is :meth:`disabled`."""
        if not self.contributing:
            return {}
        return {kind: table(task_ids, self.dropout) for kind, table in self.tables.items()}

    def _batch_size(self, inputs: dict[str, Any]) -> int:
        for name in ("input_ids", "inputs_embeds", "attention_mask"):
            if inputs.get(name) is not None:
                return inputs[name].shape[0]
        raise IncompatibleModelError("pass input_ids or inputs_embeds.")

    def run(self, base_model, inputs, task_ids):
        task_ids = self.check_task_ids(task_ids, self._batch_size(inputs))
        fill_position_ids(base_model, inputs)
        # a mixed-task batch computes each distinct task's prefix once (prefix dropout is drawn
        # per task and call); packed rows may hold several tasks, each query seeing its own
        with self.injector.activate_tasks(task_ids, self.prefixes) as while_packed:
            return call_base(self, base_model, inputs, while_packed=while_packed)

    def generate(self, base_model, inputs, task_ids, **kwargs):
        task_ids = self.check_task_ids(task_ids, self._batch_size(inputs))
        # computed once: every decoding step reuses the same static prefix
        with torch.no_grad(), self.injector.activate_tasks(task_ids, self.prefixes) as while_packed:
            return generate_base(self, base_model, inputs, while_packed, **kwargs)

    def detach(self, base_model) -> None:
        self.injector.detach()

    def checkpoint_context(self):
        # called when a checkpointed layer runs forward: recomputation sees the same prefixes
        captured = self.injector.state()
        return contextlib.nullcontext(), self.injector.restored(captured)

    def adapter_geometry(self):
        return self.injector.geometry()

    # -- PEFT's PREFIX_TUNING: (m, layer · 2 · n_kv · head_dim), keys at positions 0..m-1 ---------
    def peft_export(self, base_model):
        if self.config.num_tasks != 1 or getattr(
            self.config, "layers", None
        ):  # p-tuning-v2 may prompt some layers only
            raise AdapterError(
                "PEFT prefix tuning has one prefix on every layer: export needs num_tasks=1 and all layers."
            )
        table = self.tables["self"]
        g = table.geometry
        if g.value_width != g.head_dim:
            raise AdapterError(
                "keys and values of this model have different head sizes (latent attention); PEFT's "
                "prefix layout has one size for both, so this adapter has no PEFT equivalent."
            )
        keys, values = table(None, nn.Identity())  # (1, L, n_kv, m, d)
        keys = rotate_keys(base_model, keys.detach(), table.m)
        flat = torch.stack([keys, values.detach().float()], dim=2)  # (1, L, 2, n_kv, m, d)
        embeddings = flat.permute(0, 4, 1, 2, 3, 5).reshape(table.m, g.n_layers * 2 * g.n_kv_heads * g.head_dim)
        return PeftPrompt(
            "PREFIX_TUNING",
            embeddings,
            {
                "token_dim": g.n_kv_heads * g.head_dim,
                "num_attention_heads": g.n_kv_heads,
                "num_layers": g.n_layers,
                "encoder_hidden_size": g.n_kv_heads * g.head_dim,
                "prefix_projection": False,
            },
        )

    @classmethod
    def peft_options(cls, peft_config):
        return {"num_virtual_tokens": int(peft_config["num_virtual_tokens"]), "projection": False}

    def state_from_peft(self, base_model, embeddings):
        table = self.tables["self"]
        g, m = table.geometry, table.m
        flat = (
            embeddings.float().view(m, g.n_layers, 2, g.n_kv_heads, g.head_dim).permute(2, 1, 3, 0, 4)
        )  # (2, L, H, m, d)
        keys = rotate_keys(base_model, flat[0].unsqueeze(0), -m)[0]
        ours = torch.stack([keys, flat[1]], dim=1).permute(3, 0, 1, 2, 4).reshape(1, m, -1)
        return {"tables.self.prefix": ours}

    def param_groups(self, learning_rate, weight_decay):
        prefix, projection = [], []
        for name, p in self.named_parameters():
            (projection if ".mlp." in name else prefix).append(p)
        groups = [{"name": "prefix", "params": prefix, "lr": learning_rate, "weight_decay": 0.0}]
        if projection:
            groups.append(
                {"name": "prefix-projection", "params": projection, "lr": learning_rate, "weight_decay": weight_decay}
            )
        return groups
