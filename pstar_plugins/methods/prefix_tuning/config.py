from __future__ import annotations

from dataclasses import dataclass, field

from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.contract.spec import MethodConfig, one_of, positive_int

INITS = ("random", "text")


@dataclass
class PrefixTuningConfig(MethodConfig):
    """Trainable key/value prefixes in every attention layer."""

    num_virtual_tokens: int = field(
        default=10, metadata={"help": "prefix length m (Li & Liang: 5-10 for table-to-text, 200 for summarisation)"}
    )
    projection: bool = field(
        default=True, metadata={"help": "reparameterise P = MLP(P') while training (fold() removes the MLP)"}
    )
    projection_input_size: int = field(default=0, metadata={"help": "width of P' (0: the model's hidden size)"})
    projection_hidden_size: int = field(default=512, metadata={"help": "middle width of the Linear-Tanh-Linear MLP"})
    prefix_dropout: float = field(default=0.0, metadata={"help": "dropout on the prefix keys/values while training"})
    init_std: float = field(default=0.02, metadata={"help": "std of the random prefix when projection is off"})
    init: str = field(
        default="random",
        metadata={
            "help": (
                "random | text: start from the keys/values the frozen model computes for init_text (needs "
                "projection off)"
            )
        },
    )
    init_text: str = field(
        default="", metadata={"help": "text whose per-layer keys/values initialise the prefix (init=text)"}
    )

    def validate(self) -> None:
        super().validate()
        positive_int(self, "num_virtual_tokens")
        positive_int(self, "projection_hidden_size")
        if not isinstance(self.projection_input_size, int) or self.projection_input_size < 0:
            raise ConfigError(
                f"projection_input_size={self.projection_input_size!r}: expected 0 (hidden size) or a positive integer."
            )
        if not 0.0 <= float(self.prefix_dropout) < 1.0:
            raise ConfigError(f"prefix_dropout={self.prefix_dropout!r}: expected a probability in [0, 1).")
        if float(self.init_std) <= 0:
            raise ConfigError(f"init_std={self.init_std!r}: expected a positive number.")
        one_of(self, "init", INITS)
        if self.init == "text":
            if not self.init_text.strip():
                raise ConfigError(
                    "init='text' needs a non-empty init_text (e.g. --init-text 'Classify the sentiment of the review')."
                )
            if self.projection:
                raise ConfigError(
                    "init='text' sets the prefix itself, which the MLP reparameterisation (projection=true) "
                    "has no inverse for; pass --projection false, or init='random'."
                )

    def for_loading(self) -> "PrefixTuningConfig":
        return self.replace(init="random", init_text="")
