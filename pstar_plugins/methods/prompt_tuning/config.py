from __future__ import annotations

from dataclasses import dataclass, field

from pstar_plugins.contract.errors import ConfigError
from pstar_plugins.contract.spec import MethodConfig, one_of, positive_int

INITS = ("random", "vocab", "text", "labels")
POSITIONS = ("start", "after_bos")


@dataclass
class PromptTuningConfig(MethodConfig):
    """m trainable vectors inserted into the input embeddings, ``[P; E]``."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "prompt length m (Lester et al. use 20-100)"})
    init: str = field(
        default="vocab",
        metadata={
            "help": (
                "initialisation: random | vocab (frequent tokens) | text (init_text) | labels (label_words, then vocab)"
            )
        },
    )
    init_text: str = field(
        default="", metadata={"help": "text whose token embeddings initialise the prompt (init=text)"}
    )
    label_words: list[str] = field(default_factory=list, metadata={"help": "class-label words (init=labels)"})
    vocab_sample_size: int = field(
        default=5000,
        metadata={
            "help": "init=vocab samples from the first N token ids (BPE/SentencePiece order them roughly by frequency)"
        },
    )
    position: str = field(default="start", metadata={"help": "start: [P; E]; after_bos: [BOS; P; E] (keeps BOS first)"})

    def validate(self) -> None:
        super().validate()
        positive_int(self, "num_virtual_tokens")
        positive_int(self, "vocab_sample_size")
        one_of(self, "init", INITS)
        one_of(self, "position", POSITIONS)
        if self.init == "text" and not self.init_text.strip():
            raise ConfigError("init='text' needs a non-empty init_text (e.g. --init-text 'Classify the sentiment').")
        if self.init == "labels" and not self.label_words:
            raise ConfigError("init='labels' needs label_words (e.g. --label-words negative positive).")

    def for_loading(self) -> "PromptTuningConfig":
        return self.replace(init="random", init_text="", label_words=[])
