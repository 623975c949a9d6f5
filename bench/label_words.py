"""Training-step time with multi-token label words against single-token ones on the same inputs.

Prompt tuning on frozen SmolLM2-135M-Instruct, one batch of 16 real RTE rows
(``../shared/data/rte/train.jsonl``), one step = forward + backward + AdamW step. The contenders
differ only in their label words and in how multi-token words are scored:

* ``single``: ``yes no maybe``, one token each: the answer slot's logits give every class;
* ``multi``: ``entailment contradiction neutral`` (``entailment`` is two SmolLM2 tokens), scored
  in one pass: the input once with its KV cache, every class's continuation once from it;
* ``multi_all``: ``entailed refuted undetermined``, two SmolLM2 tokens each, in one pass: the
  case where every class has a continuation;
* ``multi_per_class``: the same words, each appended to the whole input and run separately
  (``Verbalizer.scores_per_class``, the path before one-pass scoring).

With packing on (as ``pstar_plugins.train`` runs; ``--padded`` adds the first two with packing
off). ``single``, ``multi`` and ``multi_all`` alternate (median of ``--repeats``); the per-class
loop, three model calls per step, is timed ``--per-class-repeats`` times after them.
Goal: ``multi`` and ``multi_all`` at most 1.3 times ``single``. Prints the table and writes
``bench/results/label_words.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TEMPLATE = "Premise: {sentence1}\nHypothesis: {sentence2}\nRelation:{answer}"
SINGLE = ["yes", "no", "maybe"]
MULTI = ["entailment", "contradiction", "neutral"]
MULTI_ALL = ["entailed", "refuted", "undetermined"]
GOAL = 1.3


def rte_rows(n: int) -> list[dict]:
    with open(C.SHARED_DATA / "rte" / "train.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="RTE rows in the batch")
    p.add_argument("--padded", action="store_true", help="also time single and multi with packing off")
    p.add_argument("--per-class-repeats", type=int, default=1, help="timed steps of the per-class loop")
    C.add_common_arguments(p, repeats=3, warmup=1)
    args = p.parse_args(argv)
    dtype = C.dtype_of(args)
    torch.manual_seed(0)

    from pstar_plugins import build_model
    from pstar_plugins.mechanisms.template import Template
    from pstar_plugins.tasks.verbalizer import Verbalizer, recording

    base, tokenizer = C.smollm2(dtype)
    model = build_model(base, "prompt-tuning", tokenizer=tokenizer, num_virtual_tokens=args.virtual_tokens).train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    rows = rte_rows(args.batch)
    labels = [r["label"] for r in rows]
    template = Template.parse(TEMPLATE)
    single = Verbalizer(tokenizer, template, SINGLE, masked_lm=False)
    multi = Verbalizer(tokenizer, template, MULTI, masked_lm=False)
    multi_all = Verbalizer(tokenizer, template, MULTI_ALL, masked_lm=False)
    assert all(len(ids) > 1 for ids in multi_all.words), "multi_all must hold only multi-token words"
    batches = {
        name: v.encode(rows, labels, max_length=256)
        for name, v in (("single", single), ("multi", multi), ("multi_all", multi_all))
    }
    lengths = batches["single"].inputs["attention_mask"].sum(1)

    def loss_of(verbalizer, batch, per_class: bool):
        scores = verbalizer.scores_per_class(model, batch) if per_class else verbalizer.scores(model, batch)
        return F.cross_entropy(scores, batch.labels.to(scores.device))

    def stepper(verbalizer, name: str, packing: bool, per_class: bool = False):
        def step():
            model.packing = packing
            loss = loss_of(verbalizer, batches[name], per_class)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    contenders = {
        "single": stepper(single, "single", True),
        "multi": stepper(multi, "multi", True),
        "multi_all": stepper(multi_all, "multi_all", True),
    }
    if args.padded:
        contenders.update(single_padded=stepper(single, "single", False), multi_padded=stepper(multi, "multi", False))
    model.packing = True
    with torch.no_grad(), recording() as paths:  # the same scores either way, before any step moves the prompt
        one_pass = float(loss_of(multi, batches["multi"], False))
        per_class = float(loss_of(multi, batches["multi"], True))
        one_pass_all = float(loss_of(multi_all, batches["multi_all"], False))
        per_class_all = float(loss_of(multi_all, batches["multi_all"], True))
    with recording() as step_paths:  # the path of every multi-token step
        times = C.alternate(contenders, args.repeats, args.warmup)
    paths = paths + step_paths
    # the old path, a model call per class: timed after the others, which warmed the process up
    times.update(
        C.alternate({"multi_per_class": stepper(multi, "multi", True, per_class=True)}, args.per_class_repeats, 0)
    )
    medians = {name: C.median(t) for name, t in times.items()}
    ratios = {
        "multi_vs_single": medians["multi"] / medians["single"],
        "multi_all_vs_single": medians["multi_all"] / medians["single"],
        "multi_per_class_vs_single": medians["multi_per_class"] / medians["single"],
    }
    if args.padded:
        ratios["multi_padded_vs_single_padded"] = medians["multi_padded"] / medians["single_padded"]
    words = {w: len(ids) for w, ids in zip(SINGLE + MULTI + MULTI_ALL, single.words + multi.words + multi_all.words)}
    print(
        f"SmolLM2-135M-Instruct, prompt tuning (m={args.virtual_tokens}), {args.batch} RTE rows of "
        f"{int(lengths.min())}-{int(lengths.max())} tokens ({int(lengths.sum())} in all), {args.dtype}"
    )
    print("label-word tokens:", ", ".join(f"{w} {n}" for w, n in words.items()))
    print("scoring paths:", ", ".join(sorted(set(paths))))
    print(
        f"initial loss: one pass {one_pass:.6f}, per class {per_class:.6f} ({' '.join(MULTI)}); "
        f"one pass {one_pass_all:.6f}, per class {per_class_all:.6f} ({' '.join(MULTI_ALL)})"
    )
    for name, value in medians.items():
        print(f"  {name:16} {value * 1e3:8.1f} ms per step (median of {len(times[name])})")
    print(f"multi / single (packing on):  {ratios['multi_vs_single']:.2f}  (goal <= {GOAL})")
    print(f"multi_all / single:           {ratios['multi_all_vs_single']:.2f}  (goal <= {GOAL})")
    print(f"per-class loop / single:      {ratios['multi_per_class_vs_single']:.2f}")
    if args.padded:
        print(f"multi / single (packing off): {ratios['multi_padded_vs_single_padded']:.2f}")
    payload = {
        "model": "SmolLM2-135M-Instruct",
        "method": "prompt-tuning",
        "virtual_tokens": args.virtual_tokens,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "per_class_repeats": args.per_class_repeats,
        "template": TEMPLATE,
        "batch": {
            "rows": args.batch,
            "real_tokens": int(lengths.sum()),
            "longest": int(lengths.max()),
            "shortest": int(lengths.min()),
        },
        "label_word_tokens": words,
        "scoring_paths": sorted(set(paths)),
        "initial_loss": {
            "one_pass": one_pass,
            "per_class": per_class,
            "one_pass_all": one_pass_all,
            "per_class_all": per_class_all,
        },
        "goal": {"multi_vs_single": f"<= {GOAL}", "multi_all_vs_single": f"<= {GOAL}"},
        "steps": {name: {"median_seconds": medians[name], "seconds": times[name]} for name in times},
        **ratios,
    }
    if not args.no_write:
        print("wrote", C.write_result("label_words", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
