"""Training step (forward + backward + optimizer step) of each method against PEFT's equivalent and
against the frozen-model floor, on SmolLM2-135M-Instruct, side by side in one run.

Pairs (same prompt length m, same batch, same token lengths):
    prompt-tuning  <-> PEFT PromptTuningConfig
    prefix-tuning  <-> PEFT PrefixTuningConfig(prefix_projection=True), same MLP width
    p-tuning       <-> PEFT PromptEncoderConfig (LSTM), m soft tokens in front of the text
    p-tuning-v2    <-> PEFT PrefixTuningConfig(prefix_projection=False)
Workloads: SST-2 classification through label words (the answer slot's log-probabilities) and
E2E data-to-text generation with the loss on the target tokens only. Each side computes what its
library's normal path computes: ours asks the model for logits only where a label is predicted;
PEFT gets ``logits_to_keep=1`` for classification too (it passes it through to the model) and
computes its loss from ``labels`` for generation (logits at every position, virtual ones included).

Ours runs as ``pstar_plugins.train`` does, padding-free (``PStarModel.packing``, ``mechanisms/packing.py``:
the frozen model computes real positions only); ``ours_padded`` is the same model with packing
off, to show what that part is worth.

Floor: the same frozen model with no method, forward plus a backward that reaches the input
embeddings, over the same padded batch (L user tokens; L + m for methods that lengthen the
input), the loss computed as ours is. Contenders alternate call by call; medians of ``--repeats`` after
``--warmup`` rounds. Peak memory: one step's peak above the resident model.

    python bench/train_step.py [--repeats 7] [--workloads sst2 e2e]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

METHODS = ("prompt-tuning", "prefix-tuning", "p-tuning", "p-tuning-v2")
LONGER_INPUT = {"prompt-tuning", "p-tuning"}  # methods whose virtual tokens are input positions


def ours_options(method: str, m: int, template: str) -> dict:
    return {
        "prompt-tuning": {"num_virtual_tokens": m, "init": "random"},
        "prefix-tuning": {"num_virtual_tokens": m, "projection": True, "projection_hidden_size": 512},
        "p-tuning": {
            "template": f"{{soft:{m}}} " + template,
            "encoder": "lstm",
            "encoder_hidden_size": 576,
            "init": "random",
        },
        "p-tuning-v2": {"num_virtual_tokens": m, "projection": False, "head": "none"},
    }[method]


def peft_config(method: str, m: int):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "prompt-tuning": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=m),
        "prefix-tuning": lambda: PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=m, prefix_projection=True, encoder_hidden_size=512
        ),
        "p-tuning": lambda: PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=m, encoder_reparameterization_type="LSTM", encoder_hidden_size=576
        ),
        "p-tuning-v2": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=m, prefix_projection=False),
    }[method]()


class Workload:
    """One batch, encoded for ours (template with soft slots where the method has them) and for
    PEFT and the floor (the plain template); the loss each side computes."""

    def __init__(self, name: str, tokenizer, batch_size: int) -> None:
        from pstar_plugins.mechanisms.template import Template

        self.name, self.tokenizer = name, tokenizer
        self.template = C.SST2_TEMPLATE if name == "sst2" else C.E2E_TEMPLATE
        self.rows = C.sst2_rows(batch_size) if name == "sst2" else C.e2e_rows(batch_size)
        self.plain = self.encode(Template.parse(self.template))
        if name == "sst2":
            self.label_ids = torch.tensor([self.verbalizer.words[c][0] for c in range(len(C.LABEL_WORDS))])

    def encode(self, template) -> dict:
        dev = C.device()
        if self.name == "sst2":
            from pstar_plugins.tasks.verbalizer import Verbalizer

            self.verbalizer = Verbalizer(self.tokenizer, template, C.LABEL_WORDS, masked_lm=False)
            labels = [int(r["label"]) for r in self.rows]
            enc = self.verbalizer.encode(self.rows, labels, max_length=128)
            return {"inputs": {k: v.to(dev) for k, v in enc.inputs.items()}, "gold": enc.labels.to(dev), "encoded": enc}
        from pstar_plugins.tasks.generation import training_batch

        batch = training_batch(template, self.tokenizer, self.rows, "ref", 128)
        return {"inputs": {k: v.to(dev) for k, v in batch.items()}}

    def tokens(self) -> dict:
        ids = self.plain["inputs"]["input_ids"]
        return {
            "rows": ids.shape[0],
            "length": ids.shape[1],
            "real_tokens": int(self.plain["inputs"]["attention_mask"].sum()),
        }

    # ------------------------------------------------------------------ losses
    def ours_loss(self, model, encoded: dict) -> torch.Tensor:
        if self.name == "sst2":
            scores = self.verbalizer.class_scores(model, encoded["encoded"], False)
            return F.cross_entropy(scores, encoded["gold"])
        from pstar_plugins.tasks.generation import target_token_loss

        return target_token_loss(model, encoded["inputs"])

    def label_word_loss(self, model, **inputs) -> torch.Tensor:
        """Cross-entropy over the label words' log-probabilities at the answer slot (the last column)."""
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        scores = F.log_softmax(logits.float(), -1)[:, self.label_ids.to(logits.device)]
        return F.cross_entropy(scores, self.plain["gold"])

    def peft_loss(self, model) -> torch.Tensor:
        from pstar_plugins.mechanisms.template import TEMPLATE_SLOTS

        inputs = {k: v for k, v in self.plain["inputs"].items() if k != TEMPLATE_SLOTS}
        if self.name == "sst2":
            return self.label_word_loss(model, **inputs)
        return model(**inputs).loss

    def floor_loss(self, base, extra: int) -> torch.Tensor:
        """No method: the frozen model over the same tokens (plus ``extra`` positions standing in
        for virtual tokens), gradient to the input embeddings, loss computed as ours is."""
        inputs = self.plain["inputs"]
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = base.get_input_embeddings()(ids)
        if extra:
            block = embeds[:, :1].detach().expand(-1, extra, -1).clone()
            embeds = torch.cat([block, embeds], 1)
            mask = torch.cat([mask.new_ones(mask.shape[0], extra), mask], 1)
        embeds = embeds.detach().requires_grad_(True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batch = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}
        if self.name == "sst2":
            return self.label_word_loss(base, **batch)
        from pstar_plugins.tasks.generation import target_token_loss

        labels = inputs["labels"]
        if extra:  # the stand-in positions carry no label
            labels = torch.cat([labels.new_full((labels.shape[0], extra), -100), labels], 1)
        return target_token_loss(base, {**batch, "labels": labels})


def stepper(loss_fn, params) -> callable:
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = loss_fn()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def measure(contenders: dict, repeats: int, warmup: int) -> dict:
    times = C.alternate(contenders, repeats, warmup)
    out = {}
    for name, fn in contenders.items():
        with C.PeakMemory() as mem:
            fn()
        out[name] = {"median_seconds": C.median(times[name]), "seconds": times[name], "peak_bytes": mem.peak}
    return out


def run_method(method: str, work: Workload, m: int, repeats: int, warmup: int, dtype) -> dict:
    from peft import get_peft_model

    from pstar_plugins import build_model
    from pstar_plugins.mechanisms.template import Template

    base_ours, tokenizer = C.smollm2(dtype)
    options = ours_options(method, m, work.template)
    ours = build_model(base_ours, method, tokenizer=tokenizer, **options).train()
    encoded = work.encode(Template.parse(options["template"])) if "template" in options else work.plain
    ours_params = [p for p in ours.parameters() if p.requires_grad]

    base_peft, _ = C.smollm2(dtype)
    peft_model = get_peft_model(base_peft, peft_config(method, m)).train()
    peft_params = [p for p in peft_model.parameters() if p.requires_grad]

    extra = m if method in LONGER_INPUT else 0

    def ours_loss(packing: bool):
        def loss():
            ours.packing = packing
            return work.ours_loss(ours, encoded)

        return loss

    contenders = {
        "ours": stepper(ours_loss(True), ours_params),
        "ours_padded": stepper(ours_loss(False), ours_params),
        "peft": stepper(lambda: work.peft_loss(peft_model), peft_params),
        "floor": stepper(lambda: work.floor_loss(peft_model.get_base_model(), extra), []),
    }
    with torch.no_grad():  # the same loss on the same batch: every side computes the same thing
        ours_loss0, peft_loss0 = float(ours_loss(True)()), float(work.peft_loss(peft_model))
        padded_loss0 = float(ours_loss(False)())
    result = measure(contenders, repeats, warmup)
    ours.activation_checkpointing_enable()
    result["ours_checkpointed"] = measure({"ours_checkpointed": contenders["ours"]}, max(3, repeats // 2), 1)[
        "ours_checkpointed"
    ]
    return {
        "ours_trainable": sum(p.numel() for p in ours_params),
        "peft_trainable": sum(p.numel() for p in peft_params),
        "floor_extra_positions": extra,
        "initial_loss": {"ours": ours_loss0, "ours_padded": padded_loss0, "peft": peft_loss0},
        **result,
        "time_vs_peft": result["ours"]["median_seconds"] / result["peft"]["median_seconds"],
        "time_vs_floor": result["ours"]["median_seconds"] / result["floor"]["median_seconds"],
        "memory_vs_peft": result["ours"]["peak_bytes"] / max(1, result["peft"]["peak_bytes"]),
        "checkpointed_memory_vs_peft": result["ours_checkpointed"]["peak_bytes"] / max(1, result["peft"]["peak_bytes"]),
        "padded_time_vs_peft": result["ours_padded"]["median_seconds"] / result["peft"]["median_seconds"],
        "padded_memory_vs_peft": result["ours_padded"]["peak_bytes"] / max(1, result["peft"]["peak_bytes"]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["sst2", "e2e"], choices=["sst2", "e2e"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--sst2-batch", type=int, default=16)
    p.add_argument("--e2e-batch", type=int, default=8)
    C.add_common_arguments(p, repeats=7)
    args = p.parse_args(argv)
    dtype = C.dtype_of(args)
    torch.manual_seed(0)
    _, tokenizer = C.smollm2(dtype)
    results = {}
    for wname in args.workloads:
        work = Workload(wname, tokenizer, args.sst2_batch if wname == "sst2" else args.e2e_batch)
        results[wname] = {"batch": work.tokens(), "methods": {}}
        for method in args.methods:
            r = run_method(method, work, args.virtual_tokens, args.repeats, args.warmup, dtype)
            results[wname]["methods"][method] = r
            print(
                f"{wname:5} {method:14} ours {r['ours']['median_seconds'] * 1e3:7.1f} ms  peft "
                f"{r['peft']['median_seconds'] * 1e3:7.1f} ms"
                f"  floor {r['floor']['median_seconds'] * 1e3:7.1f} ms | time/peft {r['time_vs_peft']:.2f}  "
                f"time/floor {r['time_vs_floor']:.2f}"
                f" | mem ours {C.fmt_bytes(r['ours']['peak_bytes'])} peft {C.fmt_bytes(r['peft']['peak_bytes'])}"
                f" ckpt {C.fmt_bytes(r['ours_checkpointed']['peak_bytes'])} ({r['memory_vs_peft']:.2f}x, ckpt "
                f"{r['checkpointed_memory_vs_peft']:.2f}x)"
                f" | padded: time/peft {r['padded_time_vs_peft']:.2f} mem/peft {r['padded_memory_vs_peft']:.2f}",
                flush=True,
            )
    payload = {
        "dtype": args.dtype,
        "virtual_tokens": args.virtual_tokens,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "model": "SmolLM2-135M-Instruct",
        "goals": {
            "time_vs_peft": "<= 0.9",
            "time_vs_floor": "<= 1.05",
            "memory_vs_peft": "<= 0.7",
            "checkpointed_memory_vs_peft": "<= 0.4",
        },
        "workloads": results,
    }
    if not args.no_write:
        print("wrote", C.write_result("train_step", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
