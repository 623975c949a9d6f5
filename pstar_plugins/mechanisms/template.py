"""Prompt templates: text with ``{field}`` slots, one ``{answer}`` slot and ``{soft}`` / ``{soft:N}``
continuous tokens (P-tuning's ``[P1; X; P2; Y; P3]``, Liu et al. 2021). Literal text between
slots stays as real "anchor" tokens. Braces are escaped as ``{{`` and ``}}``.

Example: ``"{soft:3} Review: {sentence} {soft:2} Sentiment:{answer}"``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from pstar_plugins.contract.errors import ConfigError, DataError

_SLOT = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class Field:
    name: str


@dataclass(frozen=True)
class Soft:
    count: int


@dataclass(frozen=True)
class Answer:
    pass


Part = Literal | Field | Soft | Answer


#: the batch key under which tasks carry a template's soft-slot numbers (the soft-token number at
#: each position, :data:`SLOT_PAD` elsewhere) until a model is called: :func:`bind_slots` hands
#: them to the input the model's method declares (``PromptMethod.slot_input``)
TEMPLATE_SLOTS = "template_slots"
SLOT_PAD = -1


@dataclass
class EncodedPrompt:
    """Token ids of one example; ``slots[i]`` is the soft-token number at position ``i`` or -1,
    and ``answer_index`` the position of the first answer token (or mask) when an answer slot exists."""

    input_ids: list[int]
    slots: list[int]
    answer_index: int | None = None


def bind_slots(inputs: dict, slot_input: str | None) -> dict:
    """``inputs`` for a call of a model whose method reads a template's soft slots from the input
    ``slot_input`` (``PromptMethod.slot_input``; ``None``: a bare model, or a method that reads
    none): the slots (:data:`TEMPLATE_SLOTS`) under that name, refused when they hold soft tokens
    no method would read."""
    if TEMPLATE_SLOTS not in inputs:
        return inputs
    inputs = dict(inputs)
    slots = inputs.pop(TEMPLATE_SLOTS)
    name = slot_input
    if name is not None:
        inputs[name] = slots
    elif bool((slots != SLOT_PAD).any()):
        raise ConfigError(
            "the template has {soft} tokens, but the model's method reads no template slots "
            "(PromptMethod.slot_input); use a template without {soft} tokens, or a method that has them."
        )
    return inputs


# the default SST-2 template of the training script and of `pstar eval`
DEFAULT_TEMPLATE = "Review: {sentence} Sentiment:{answer}"


def from_command_line(text: str) -> str:
    """A template typed on a command line: ``\\n`` and ``\\t`` become a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


class Template:
    def __init__(self, text: str, parts: list[Part]) -> None:
        self.text = text
        self.parts = parts

    @classmethod
    def parse(cls, text: str, require_field: bool = True, allow_soft: bool = True) -> "Template":
        if not isinstance(text, str):
            raise ConfigError(f"template must be a string, got {type(text).__name__}.")
        parts: list[Part] = []
        buffer = []
        pos = 0
        for match in _SLOT.finditer(text):
            buffer.append(text[pos : match.start()])
            pos = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                buffer.append(token[0])
                continue
            if token in ("{", "}"):
                raise ConfigError(
                    f"template {text!r}: unmatched {token!r} at offset {match.start()}; write {token * 2} for a "
                    "literal brace."
                )
            if buffer and "".join(buffer):
                parts.append(Literal("".join(buffer)))
            buffer = []
            slot = match.group(1).strip()
            if slot == "answer":
                parts.append(Answer())
            elif slot == "soft" or slot.startswith("soft:"):
                count = slot[5:] or "1"
                if not count.isdigit() or int(count) < 1:
                    raise ConfigError(f"template {text!r}: {{{slot}}} needs a positive count, e.g. {{soft:4}}.")
                if not allow_soft:
                    raise ConfigError(
                        f"template {text!r}: {{soft}} tokens are only for the p-tuning method; remove them."
                    )
                parts.append(Soft(int(count)))
            elif _FIELD.match(slot):
                parts.append(Field(slot))
            else:
                raise ConfigError(
                    f"template {text!r}: unknown slot {{{slot}}}; expected a column name like {{sentence}}, "
                    "{answer}, {soft} or {soft:N}."
                )
        rest = "".join(buffer) + text[pos:]
        if rest:
            parts.append(Literal(rest))
        if sum(isinstance(p, Answer) for p in parts) > 1:
            raise ConfigError(f"template {text!r} has more than one {{answer}} slot; keep exactly one.")
        if require_field and not any(isinstance(p, Field) for p in parts):
            raise ConfigError(f"template {text!r} has no text slot; add one such as {{sentence}} or {{text}}.")
        return cls(text, parts)

    @property
    def fields(self) -> list[str]:
        return [p.name for p in self.parts if isinstance(p, Field)]

    @property
    def num_soft_tokens(self) -> int:
        return sum(p.count for p in self.parts if isinstance(p, Soft))

    @property
    def has_answer(self) -> bool:
        return any(isinstance(p, Answer) for p in self.parts)

    def check_answer_last(self) -> None:
        """Causal LMs score or generate the answer after everything before it, so no text slot or
        soft token may follow ``{answer}`` (it would be cut off without a word)."""
        parts = self.parts
        at = next((i for i, p in enumerate(parts) if isinstance(p, Answer)), None)
        if at is None:
            return
        after = [p for p in parts[at + 1 :] if isinstance(p, (Field, Soft))]
        if after:
            what = ", ".join(f"{{{p.name}}}" if isinstance(p, Field) else f"{{soft:{p.count}}}" for p in after)
            raise ConfigError(
                f"template {self.text!r}: {what} comes after {{answer}}, but a causal LM predicts the answer from the "
                "text before it; move {answer} to the end (e.g. 'Review: {sentence} Sentiment:{answer}'), or use "
                "--model-kind masked-lm, which fills the answer slot anywhere."
            )

    def encode(
        self,
        example: Mapping[str, Any],
        tokenizer,
        answer_ids: list[int] | None = None,
        placeholder_id: int = 0,
        add_special_tokens: bool = True,
        stop_at_answer: bool = False,
    ) -> EncodedPrompt:
        """Tokenise ``example`` through the template.

        Adjacent literal and field text is tokenised as one string so that word boundaries match
        how the model saw text in pre-training. ``answer_ids`` are placed at the answer slot (a
        label word's ids for causal LMs, ``[MASK]`` ids for masked LMs); trailing spaces before the
        slot move into the answer (``"Sentiment: {answer}"`` scores ``" positive"``).
        """
        ids: list[int] = []
        index: list[int] = []
        answer_index = None
        soft_seen = 0
        run: list[str] = []

        def flush(before_answer: bool = False) -> None:
            text = "".join(run)
            run.clear()
            if before_answer:
                text = text.rstrip(" ")
            if text:
                new = list(tokenizer(text, add_special_tokens=False)["input_ids"])
                ids.extend(new)
                index.extend([-1] * len(new))

        for part in self.parts:
            if isinstance(part, Literal):
                run.append(part.text)
            elif isinstance(part, Field):
                if part.name not in example:
                    raise DataError(
                        f"template field {{{part.name}}} is not a column of the example (columns: {sorted(example)}); "
                        "change the slot with --template or map a column to it with --column DATA_COLUMN="
                        + part.name
                        + "."
                    )
                run.append(str(example[part.name]))
            elif isinstance(part, Soft):
                flush()
                ids.extend([placeholder_id] * part.count)
                index.extend(range(soft_seen, soft_seen + part.count))
                soft_seen += part.count
            else:
                flush(before_answer=True)
                answer_index = len(ids)
                if answer_ids:
                    ids.extend(answer_ids)
                    index.extend([-1] * len(answer_ids))
                if stop_at_answer:
                    run.clear()
                    break
        flush()
        if add_special_tokens:
            prefix, suffix = special_tokens(tokenizer)
            ids = prefix + ids + suffix
            index = [-1] * len(prefix) + index + [-1] * len(suffix)
            if answer_index is not None:
                answer_index += len(prefix)
        return EncodedPrompt(ids, index, answer_index)


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The special ids the tokenizer adds before and after a text (e.g. ``[CLS]``/``[SEP]``, BOS)."""
    cached = getattr(tokenizer, "_pstar_special", None)
    if cached is not None:
        return cached
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    result: tuple[list[int], list[int]] = ([], [])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            result = (full[:start], full[start + len(plain) :])
            break
    try:
        tokenizer._pstar_special = result
    except AttributeError:
        pass
    return result


def check_label_words(words: list[str]) -> None:
    """Label words must be real, distinct words (they become the classes, in order)."""
    blank = [w for w in words if not w.strip()]
    if blank:
        raise ConfigError(
            f"--label-words {words!r}: {len(blank)} empty or blank word(s); give one real word per class."
        )
    stripped = [w.strip() for w in words]
    repeated = sorted({w for w in stripped if stripped.count(w) > 1})
    if repeated:
        raise ConfigError(
            f"--label-words {words!r}: {repeated} appear more than once, so two classes could not be told "
            "apart; give one distinct word per class."
        )
    if len(words) < 2:
        raise ConfigError(f"--label-words {words!r}: a classifier needs at least two label words.")
