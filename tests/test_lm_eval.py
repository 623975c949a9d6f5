"""lm-evaluation-harness (HF model, peft=) on an exported adapter agrees with pstar eval --adapter
row by row (bench/lm_eval_compare.py on a tiny model)."""

import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

from pstar_plugins import build_model
from pstar_plugins.contract.errors import AdapterError
from tests.test_train_entry_point import needs_model

pytest.importorskip("lm_eval", reason="lm-eval is installed by scripts/setup.sh ([lm-eval])")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import lm_eval_compare  # noqa: E402

# lm-eval loads the exported adapter with PEFT 0.21, which reads ``is_gradient_checkpointing`` and
# passes ``past_key_values``, names transformers 5.25 deprecates
pytestmark = [
    pytest.mark.slow,
    needs_model,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
]
TEMPLATE = "Review: {sentence} Sentiment:{answer}"


def adapter(tiny_dir, out, method, task_template=TEMPLATE, **options):
    torch.manual_seed(1)
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir)
    model = build_model(tf.AutoModelForCausalLM.from_pretrained(tiny_dir), method, tokenizer=tokenizer, **options)
    model.save_adapter(
        out,
        task={
            "kind": "classification",
            "template": task_template,
            "label_words": ["negative", "positive"],
            "label_column": "label",
            "max_length": 128,
        },
    )
    return str(out)


@pytest.mark.parametrize(
    "method, options",
    [
        ("prompt-tuning", dict(num_virtual_tokens=4)),
        ("prefix-tuning", dict(num_virtual_tokens=4)),
        ("p-tuning-v2", dict(num_virtual_tokens=4, head="none")),
        ("p-tuning", dict(template="{soft:3} Review: {sentence} Sentiment:{answer}", encoder="mlp")),
    ],
)
def test_lm_eval_scores_the_exported_adapter_like_pstar_eval(tiny_dir, tmp_path, method, options):
    template = options.get("template", TEMPLATE)
    path = adapter(tiny_dir, tmp_path / "adapter", method, template, **options)
    report = lm_eval_compare.compare(
        path, str(tiny_dir), max_eval_samples=24, batch_size=8, work_dir=str(tmp_path / "work")
    )
    assert report["examples"] == 24
    assert report["lm_eval_accuracy"] == report["pstar_eval_accuracy"] == report["verbalizer_accuracy"]
    assert report["rows_with_different_prediction"] == 0
    assert report["max_abs_loglik_diff"] < 1e-4  # the same log-probabilities, up to fp32 summation order


def test_soft_tokens_mid_template_are_refused_with_the_alternative(tiny_dir, tmp_path):
    mid = "{soft:2} Review: {sentence} {soft:2} Sentiment:{answer}"
    path = adapter(tiny_dir, tmp_path / "adapter", "p-tuning", mid, template=mid)
    with pytest.raises(AdapterError, match="score such an adapter with pstar eval --adapter"):
        lm_eval_compare.compare(path, str(tiny_dir), max_eval_samples=4, work_dir=str(tmp_path / "work"))
