from __future__ import annotations

from dataclasses import dataclass, field

from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.contract.spec import ClassifierHead, one_of, positive_int
from pstar_plugins.methods.prefix_tuning.config import PrefixTuningConfig

HEADS = ("sequence-classification", "token-classification", "none")
POOLINGS = ("auto", "first", "last", "mean")
HEAD_INITS = ("auto", "label-words", "random")


@dataclass
class PTuningV2Config(PrefixTuningConfig, ClassifierHead):
    """Deep prompts (per-layer key/value prefixes) and a linear classification head.

    Defaults follow the paper: no reparameterisation (its benefit is task-dependent, §4.3), a
    prompt length under 20 for simple classification and around 100 for hard sequence tasks.
    """

    num_virtual_tokens: int = field(
        default=16, metadata={"help": "prompt length per layer (simple classification < 20; sequence labelling ~100)"}
    )
    projection: bool = field(
        default=False, metadata={"help": "reparameterise the deep prompts with an MLP (task-dependent, off by default)"}
    )
    layers: list[int] = field(
        default_factory=list,
        metadata={"help": "layer indices that get prompts (empty: every layer; negatives count from the end)"},
    )
    head: str = field(
        default="sequence-classification",
        metadata={"help": "sequence-classification | token-classification | none (keep the LM head)"},
    )
    num_labels: int = field(default=2, metadata={"help": "classes of the linear head"})
    pooling: str = field(
        default="auto",
        metadata={"help": "sequence pooling: auto (first token for encoders, last for decoders) | first | last | mean"},
    )
    classifier_dropout: float = field(default=0.1, metadata={"help": "dropout before the linear head"})
    head_init: str = field(
        default="auto",
        metadata={
            "help": "auto (label-words where the head reads the position the LM predicts from, else random) | "
            "label-words (the LM's output rows of the label words' first tokens) | random"
        },
    )
    label_words: list[str] = field(
        default_factory=list, metadata={"help": "one word per class, for head_init=label-words"}
    )

    def has_classifier_head(self) -> bool:
        return self.head != "none"

    def for_classes(self, num_classes: int) -> "PTuningV2Config":
        return self.replace(num_labels=num_classes) if self.has_classifier_head() else self

    def for_loading(self) -> "PTuningV2Config":
        return self.replace(head_init="random")  # the saved head overwrites it

    def validate(self) -> None:
        super().validate()
        one_of(self, "head", HEADS)
        one_of(self, "pooling", POOLINGS)
        if self.head != "none":
            positive_int(self, "num_labels")
            if self.num_labels < 2 and self.head == "sequence-classification":
                raise ConfigError(f"num_labels={self.num_labels}: a classification head needs at least 2 labels.")
        if not all(isinstance(i, int) for i in self.layers):
            raise ConfigError(f"layers={self.layers!r}: expected a list of layer indices.")
        one_of(self, "head_init", HEAD_INITS)
        if self.head_init == "label-words" and self.head != "sequence-classification":
            raise ConfigError(
                f"head_init='label-words' is for head='sequence-classification' (a head over classes), not "
                f"{self.head!r}; pass --head-init random."
            )
        if self.head_init == "label-words" and self.pooling not in ("auto", "last"):
            raise ConfigError(
                f"head_init='label-words' starts the head from the LM head's rows, which score the last "
                f"position; pooling={self.pooling!r} reads another: pass --pooling last (or auto), or "
                "--head-init random."
            )
        if not 0.0 <= float(self.classifier_dropout) < 1.0:
            raise ConfigError(f"classifier_dropout={self.classifier_dropout!r}: expected a probability in [0, 1).")
