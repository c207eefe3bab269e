"""LLaMA-Factory training keys honoured with its meaning: packing, additional_target, load_best_model_at_end."""

import json

import torch

from loralab import data
from loralab.config import load_config
from loralab.train import make_collator, train


def test_packed_batch_has_no_cross_sample_attention(tiny_model):
    """packing/neat_packing: one padding-free row, and each sequence's logits are as if it ran alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    seqs = [[0, 5, 9, 17, 30, 4], [0, 8, 3, 22, 4]]
    collate = make_collator(load_config(None, {"packing": True}), tokenizer=None)
    batch = collate([{"input_ids": s, "labels": s} for s in seqs])
    assert batch["input_ids"].shape == (1, 11) and "attention_mask" not in batch
    with torch.no_grad():
        # use_cache=False as in training: the packed-sequence mask is built only without a KV cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([s])).logits[0] for s in seqs]
    assert torch.allclose(packed[:6], alone[0], atol=1e-5) and torch.allclose(packed[6:], alone[1], atol=1e-5)


def test_lf_training_keys(tiny_model, tmp_path):
    data.prepare("builtin:demo", output_dir=tmp_path / "data", sample=40, split="32,8,0", name="demo")
    common = {
        "model_name_or_path": str(tiny_model),
        "dataset_dir": str(tmp_path / "data"),
        "dataset": "demo_train",
        "eval_dataset": "demo_val",
        "max_steps": 4,
        "eval_steps": 1,
        "logging_steps": 1,
        "lora_rank": 4,
        "learning_rate": 5e-2,
        "torch_threads": 1,
        "per_device_train_batch_size": 4,
    }
    summary = train(
        load_config(
            None,
            {
                **common,
                "output_dir": str(tmp_path / "packed"),
                "packing": True,
                "additional_target": "lm_head",
                "load_best_model_at_end": False,
            },
        )
    )
    assert summary["steps"] == 4 and summary["padding_efficiency"] == 1.0  # packed: no padding at all
    adapter = json.loads((tmp_path / "packed" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["lm_head"]
    log = (tmp_path / "packed" / "train.log").read_text()
    assert "the last step's (4; load_best_model_at_end is false)" in log
