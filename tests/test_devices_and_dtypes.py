"""Guards for the GPU paths that CI (CPU only) cannot run: device placement, bf16, transformers' argument names.

Each class of defect that crashed the first GPU run has a CPU test here that fails on that code:
- a tensor built on the default device (the CPU) beside a model on cuda: every tensor loralab's engine
  and trainer build must name the model's device (`loralab.testing.DevicePlacementCheck`);
- bf16: `bf16: true` is honoured on a CPU, so training, saving, loading and generating in bf16 run here
  through the real CLI; the chunked loss feeds a half-precision lm_head its own dtype;
- transformers' TrainingArguments names (the lowest declared versions run in CI too: `make test-floor`).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from loralab import decode_batch, models
from loralab.config import load_config
from loralab.generate import Engine, GenerationSettings
from loralab.testing import DevicePlacementCheck, make_random_adapter
from loralab.train import checkpointing_arguments, chunked_lm_loss, train

LORALAB = Path(sys.executable).with_name("loralab")
CONVERSATIONS = [
    [{"role": "user", "content": "What is the sum of 12 and 30?"}],
    [{"role": "user", "content": "Sort these words: cat, apple, banana. " * 3}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "hot"}],
]


def records(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Repeat the number {i}.", "input": "", "output": f"The number is {i}."}
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    (folder / "demo_train.json").write_text(json.dumps(records(16)))
    (folder / "demo_val.json").write_text(json.dumps(records(4, start=100)))
    info = {"demo_train": {"file_name": "demo_train.json"}, "demo_val": {"file_name": "demo_val.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    return folder


# --- device placement ---------------------------------------------------------------------------
def test_the_check_catches_a_tensor_left_on_the_default_device():
    """The check itself: a loralab function asked for a tensor without a device is reported, with where."""
    with DevicePlacementCheck("cpu") as check:
        decode_batch.left_pad_rows([[5, 6, 7], [8]], pad_id=0, device=None)
    assert len(check.violations) == 2 and all("decode_batch.py" in v for v in check.violations)
    assert "left_pad_rows: torch.tensor on the default device" in check.violations[0]
    with DevicePlacementCheck("cpu") as check:
        decode_batch.left_pad_rows([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert check.checked == 2 and check.violations == []


def test_engine_builds_every_tensor_on_the_model_device(tiny_model, tmp_path):
    """Prefill, decode, rows joining and leaving, greedy, seeded sampling with a repetition penalty, and
    a mixed-adapter batch: every tensor the engine makes is on the model's device."""
    adapters = {name: str(make_random_adapter(tiny_model, tmp_path / name, seed=i + 1)) for i, name in enumerate("ab")}
    engine = Engine(load_config(None, {"model_name_or_path": str(tiny_model)}), adapters)
    sampled = GenerationSettings(max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    penalised = GenerationSettings(max_new_tokens=6, repetition_penalty=1.3)
    with DevicePlacementCheck(engine.device) as check:
        engine.generate(CONVERSATIONS, GenerationSettings(max_new_tokens=6), adapter="a", batch_size=2)
        engine.generate(CONVERSATIONS[:2], sampled, adapter="b")
        rows = [
            engine.submit(CONVERSATIONS[0], penalised, adapter=None),
            engine.submit(CONVERSATIONS[1], sampled, adapter="a"),
            engine.submit(CONVERSATIONS[2], GenerationSettings(max_new_tokens=6), adapter="b"),
        ]
        engine.run(rows)
    assert all(r.error is None for r in rows)
    assert check.checked > 0 and check.violations == []


def test_training_builds_every_tensor_on_the_model_device(tiny_model, data_dir, tmp_path):
    """A training step (split into passes), validation, and generation-based validation through the engine."""
    cfg = load_config(
        None,
        {
            "model_name_or_path": str(tiny_model),
            "dataset_dir": str(data_dir),
            "dataset": "demo_train",
            "eval_dataset": "demo_val",
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "eval_steps": 2,
            "per_device_train_batch_size": 4,
            "max_tokens_per_pass": 40,
            "eval_generate_samples": 2,
            "max_new_tokens": 4,
            "torch_threads": 1,
        },
    )
    with DevicePlacementCheck("cpu", generators=False) as check:
        summary = train(cfg)
    assert summary["steps"] == 2 and summary["eval_generation"]
    assert check.checked > 0 and check.violations == []


# --- bf16 and dtypes ------------------------------------------------------------------------------
def test_pick_dtype_on_a_cpu():
    assert models.pick_dtype(load_config(None, {})) == torch.float32
    assert models.pick_dtype(load_config(None, {"bf16": True})) == torch.bfloat16
    assert models.pick_dtype(load_config(None, {"bf16": False})) == torch.float32
    fp16 = load_config(None, {"fp16": True})
    assert models.pick_dtype(fp16) == torch.float32
    assert "needs a GPU" in models.cpu_dtype_note(fp16, torch.float32)


def test_chunked_loss_feeds_a_half_precision_head_its_own_dtype():
    """fp32 hidden states (fp32 LoRA weights) into a bf16 lm_head: the GPU crash at training step 1."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    labels = torch.tensor([[-100, 3, 7, 1, 2], [-100, -100, 9, 4, -100]])
    loss = chunked_lm_loss(hidden, labels, head, chunk_tokens=2)
    loss.backward()
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    logits = head(hidden.detach().to(torch.bfloat16)).float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    assert loss.dtype == torch.float32 and torch.allclose(loss, expected, atol=1e-6)
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_checkpointing_argument_has_the_installed_transformers_name(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **checkpointing_arguments(True))
    assert getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing


def cli(*args, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LORALAB), *map(str, args)], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=600
    )


def test_bf16_train_save_load_generate_through_the_cli(tiny_model, data_dir, tmp_path):
    """bf16=true on a CPU: trained in bf16 (said in the log), adapter saved, loaded back in bf16 by
    predict and chat, and generating through the engine."""
    common = [f"model_name_or_path={tiny_model}", f"dataset_dir={data_dir}", "bf16=true", "torch_threads=1"]
    trained = cli(
        "train",
        *common,
        "dataset=demo_train",
        "eval_dataset=demo_val",
        "output_dir=run",
        "max_steps=3",
        "eval_steps=3",
        "eval_generate_samples=2",
        "max_new_tokens=4",
        "learning_rate=1e-2",
        cwd=tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "bfloat16" in (tmp_path / "run" / "train.log").read_text()
    results = json.loads((tmp_path / "run" / "train_results.json").read_text())
    assert results["steps"] == 3 and results["train_loss"] > 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

    engine = Engine(
        load_config(None, {"model_name_or_path": str(tiny_model), "bf16": True}), {"run": str(tmp_path / "run")}
    )
    assert engine.model.dtype == torch.bfloat16

    predicted = cli(
        "predict",
        *common,
        "adapter_name_or_path=run",
        "eval_dataset=demo_val",
        "max_new_tokens=5",
        "--split",
        "val",
        "-o",
        "pred",
        cwd=tmp_path,
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "pred" / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["predict"], str) for r in rows)
    assert "generation failed" not in predicted.stderr

    chatted = cli("chat", *common, "adapter_name_or_path=run", "max_new_tokens=5", cwd=tmp_path, stdin="hello\n")
    assert chatted.returncode == 0 and "Traceback" not in chatted.stderr, chatted.stderr[-3000:]
    assert "generation failed" not in chatted.stderr
