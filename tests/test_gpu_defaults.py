"""Training defaults for GPUs that can be proven on a CPU: fill_batches keeps the optimizer step and loss."""

import json
from pathlib import Path

import pytest

from loralab.config import load_config
from loralab.train import batch_layout, train


def test_batch_layout():
    lf_recipe = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "cutoff_len": 2048}
    cfg = load_config(None, lf_recipe)
    assert batch_layout(cfg, cuda=True) == (8, 1, 2048)  # one batch of 8 rows, passes of <= 1 x 2048 tokens
    assert batch_layout(cfg, cuda=False) == (1, 8, 1024)  # CPU: as configured (fill_batches unset = off)
    assert batch_layout(load_config(None, {**lf_recipe, "fill_batches": True}), cuda=False) == (8, 1, 1024)
    assert batch_layout(load_config(None, {**lf_recipe, "fill_batches": False}), cuda=True) == (1, 8, None)
    assert batch_layout(load_config(None, {**lf_recipe, "max_tokens_per_pass": 0}), cuda=True) == (8, 1, None)
    assert batch_layout(load_config(None, {**lf_recipe, "packing": True}), cuda=True) == (1, 8, None)
    assert batch_layout(load_config(None, {**lf_recipe, "neat_packing": True}), cuda=True) == (1, 8, None)
    assert batch_layout(load_config(None, {"per_device_train_batch_size": 8}), cuda=True) == (8, 1, None)


def test_batch_layout_leaves_sharded_launches_alone(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # DeepSpeed's own file may fix the accumulation
    cfg = load_config(None, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4})
    assert batch_layout(cfg, cuda=True) == (2, 4, None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rows = [
        {"instruction": f"Repeat the number {i} " + "x " * (i % 7), "input": "", "output": f"The number is {i}."}
        for i in range(24)
    ]
    (folder / "t.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"t": {"file_name": "t.json"}}))
    return folder


def test_fill_batches_keeps_the_loss_curve(tiny_model, data_dir, tmp_path):
    """Batch 1 x accumulation 4 run as 4 micro-batches or as one filled batch: the same rows per optimizer
    step (random order: group_by_length off), the same per-step losses and the same adapter."""
    import torch
    from safetensors.torch import load_file

    losses, weights = {}, {}
    for fill in (False, True):
        out = tmp_path / f"fill-{fill}"
        cfg = load_config(
            None,
            {
                "model_name_or_path": str(tiny_model),
                "dataset_dir": str(data_dir),
                "dataset": "t",
                "output_dir": str(out),
                "max_steps": 4,
                "logging_steps": 1,
                "per_device_train_batch_size": 1,
                "gradient_accumulation_steps": 4,
                "group_by_length": False,
                "lora_dropout": 0.0,
                "learning_rate": 5e-2,
                "torch_threads": 1,
                "fill_batches": fill,
                "seed": 3,
            },
        )
        train(cfg)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[fill] = [r["loss"] for r in rows if "loss" in r]
        weights[fill] = load_file(out / "adapter_model.safetensors")
    assert len(losses[True]) == 4 and losses[True] == pytest.approx(losses[False], abs=1e-5)
    # Summation order differs (one backward vs four): float noise, amplified a little by Adam at lr 5e-2.
    assert all(torch.allclose(weights[True][k], weights[False][k], atol=2e-4) for k in weights[False])
