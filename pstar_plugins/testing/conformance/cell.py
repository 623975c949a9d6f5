"""A conformance cell (one model factory, method and options) with the batches, calls and losses
the checks share, and the report that :func:`~pstar_plugins.testing.conformance.check_method`
gives for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
CAUSAL, ENCODER, SEQ2SEQ = "causal", "encoder", "seq2seq"
ROW_LENGTHS = (7, 10, 9)
DECODER_LENGTH = 4


class Skip(Exception):
    """Raised by a check that does not apply to this cell; the message is the reason."""


@dataclass
class Outcome:
    check: str
    status: str
    detail: str = ""


@dataclass
class Report:
    """What :func:`check_method` found for one cell."""

    name: str
    refused: str | None = None
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == FAILED]

    @property
    def ok(self) -> bool:
        """Refused at build time, or every check passed or did not apply."""
        return not self.failures

    def outcome(self, check: str) -> Outcome:
        return next(o for o in self.outcomes if o.check == check)

    def summary(self) -> str:
        if self.refused is not None:
            return f"{self.name}: refused at build time: {self.refused}"
        lines = [f"{self.name}: {len(self.failures)} of {len(self.outcomes)} checks failed"]
        for o in self.outcomes:
            lines.append(f"  {o.status:<7} {o.check}" + (f": {o.detail}" if o.detail else ""))
        return "\n".join(lines)


class Cell:
    """One (model factory, method, options) combination and the helpers the checks share."""

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        method: str,
        options: dict[str, Any],
        tokenizer=None,
        plugin_manager=None,
        seed: int = 0,
    ) -> None:
        self.factory = factory
        self.method = method
        self.options = dict(options)
        self.tokenizer = tokenizer
        self.plugin_manager = plugin_manager
        self.seed = seed
        probe = factory()
        config = probe.config
        self.kind = (
            SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else (CAUSAL if probe.can_generate() else ENCODER)
        )
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.vocab = int(getattr(text, "vocab_size"))
        pad = getattr(text, "pad_token_id", None)
        self.pad = int(pad) if pad is not None else 0
        self.eos = getattr(text, "eos_token_id", None)
        self.low = min(3, self.vocab - 1)
        self.supports_checkpointing = bool(getattr(probe, "supports_gradient_checkpointing", False))
        # where the factory puts the model (a GPU check builds on CUDA): every batch goes there
        self.device = next(probe.parameters()).device
        del probe

    # -- models -------------------------------------------------------------------------
    def base(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return self.factory().eval()

    def build(self, base: nn.Module | None = None, perturb: bool = True, **options):
        from pstar_plugins import build_model

        torch.manual_seed(self.seed)
        model = build_model(
            base if base is not None else self.base(),
            self.method,
            {**self.options, **options},
            tokenizer=self.tokenizer,
            plugin_manager=self.plugin_manager,
        )
        model.eval()
        if perturb:
            self.perturb(model)
        return model

    def perturb(self, model, seed: int = 1) -> None:
        """Move every trainable tensor well away from its initialisation (seeded)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.trainable_named_parameters(), key=lambda item: item[0]):
                noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                p.add_(noise * 0.3)

    # -- inputs -------------------------------------------------------------------------
    def rows(self, lengths=ROW_LENGTHS, seed: int = 0) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(self.low, self.vocab, (n,), generator=g) for n in lengths]

    def batch(
        self, model, rows: list[torch.Tensor] | None = None, side: str | None = None, seed: int = 0
    ) -> dict[str, Any]:
        """A padded batch of ``rows`` (left padding for causal LMs, right for the others) with the
        method's extra inputs and, for encoder-decoder models, decoder inputs."""
        rows = rows if rows is not None else self.rows(seed=seed)
        side = side or ("left" if self.kind == CAUSAL else "right")
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            start = length - len(r) if side == "left" else 0
            ids[i, start : start + len(r)] = r
            mask[i, start : start + len(r)] = 1
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if model is not None:
            batch.update(model.method.example_inputs(ids, mask))
        if self.kind == SEQ2SEQ:
            g = torch.Generator().manual_seed(seed + 101)
            batch["decoder_input_ids"] = torch.randint(self.low, self.vocab, (len(rows), DECODER_LENGTH), generator=g)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def forward(self, model, batch: dict[str, Any], **extra):
        inputs = dict(batch)
        extra = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
        if self.kind == CAUSAL and "logits_to_keep" not in extra:
            extra["logits_to_keep"] = inputs["input_ids"].shape[1]  # every column, the packable call
        return model(**inputs, **extra)

    def real_outputs(self, out, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Each row's outputs at its real positions (a head's row, or decoder logits)."""
        logits = out.logits
        if logits.dim() == 2 or self.kind == SEQ2SEQ:
            return [logits[i].float() for i in range(logits.shape[0])]
        mask = batch["attention_mask"]
        return [logits[i][mask[i].bool()].float() for i in range(logits.shape[0])]

    def loss(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """A fixed smooth function of every real output (for gradient comparisons)."""
        width = outputs[0].shape[-1]
        g = torch.Generator().manual_seed(7)
        weight = torch.randn(width, generator=g)
        return sum(((o * weight.to(o.device)).sum(-1) ** 2).sum() for o in outputs) / sum(o.numel() for o in outputs)

    def grads(self, model) -> dict[str, torch.Tensor]:
        return {
            n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.trainable_named_parameters()
        }
