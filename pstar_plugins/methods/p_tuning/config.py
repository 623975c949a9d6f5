from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.contract.spec import MethodConfig, one_of
from pstar_plugins.mechanisms.template import Template

ENCODERS = ("lstm", "mlp", "none")


@dataclass
class PTuningConfig(MethodConfig):
    """Continuous tokens anywhere in a template, ``[P1; X; P2; Y; P3]``."""

    template: str = field(
        default="{soft:3} {sentence} {soft:3} It was{answer}",
        metadata={"help": "template with {field} text slots, {soft:N} continuous tokens and one {answer} slot"},
    )
    encoder: str = field(
        default="lstm", metadata={"help": "prompt encoder: lstm (bi-LSTM + MLP, the paper's) | mlp | none"}
    )
    encoder_hidden_size: int = field(default=0, metadata={"help": "prompt encoder width (0: the model's hidden size)"})
    init: str = field(default="vocab", metadata={"help": "soft token initialisation: random | vocab"})

    #: the task's label words, which the method never read (the verbalizer takes them from the task)
    retired_fields: ClassVar[tuple[str, ...]] = ("label_words",)

    def validate(self) -> None:
        super().validate()
        if self.num_tasks != 1:
            raise ConfigError(
                f"num_tasks={self.num_tasks}: p-tuning holds one template per adapter; use prompt-tuning or "
                "prefix-tuning for mixed-task batches."
            )
        one_of(self, "encoder", ENCODERS)
        one_of(self, "init", ("random", "vocab"))
        if not isinstance(self.encoder_hidden_size, int) or self.encoder_hidden_size < 0:
            raise ConfigError(
                f"encoder_hidden_size={self.encoder_hidden_size!r}: expected 0 (hidden size) or a positive integer."
            )
        parsed = Template.parse(self.template)
        if parsed.num_soft_tokens == 0:
            raise ConfigError(
                f"template {self.template!r} has no {{soft}} token; p-tuning needs at least one, e.g. '{{soft:3}} "
                "{sentence}'."
            )

    @property
    def num_virtual_tokens(self) -> int:
        return Template.parse(self.template).num_soft_tokens

    def for_loading(self) -> "PTuningConfig":
        return self.replace(init="random")
