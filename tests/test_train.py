"""Training and export on the tiny model: labels the Trainer sees, run folder, best/last, resume after
SIGKILL, 2-process DDP, LoRA options, clear errors, merged export == adapter model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from loralab import train as train_mod
from loralab.config import load_config
from loralab.errors import LoralabError
from loralab.train import LengthGroupedSampler, encode_split, padding_efficiency, train

MULTI_TURN = [
    {
        "conversations": [
            {"from": "human", "value": "What is 2+2?"},
            {"from": "gpt", "value": "It is 4."},
            {"from": "human", "value": "And 3+3?"},
            {"from": "gpt", "value": "It is 6."},
        ]
    }
]


def records(n: int, start: int = 0) -> list[dict]:
    # Varied lengths, so batching and padding matter.
    return [
        {
            "instruction": f"Say number {i}" + " please" * (i % 11),
            "input": "",
            "output": f"The number is {i}." + " Yes." * (i % 5),
        }
        for i in range(start, start + n)
    ]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A LLaMA-Factory style data folder: alpaca train/val splits, a ShareGPT multi-turn file, a manifest."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "demo_train.json").write_text(json.dumps(records(32)))
    (folder / "demo_val.json").write_text(json.dumps(records(8, start=100)))
    (folder / "chat.json").write_text(json.dumps(MULTI_TURN))
    (folder / "dataset_info.json").write_text(
        json.dumps(
            {
                "demo_train": {"file_name": "demo_train.json"},
                "demo_val": {"file_name": "demo_val.json"},
                "chat": {"file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}},
            }
        )
    )
    (folder / "demo_manifest.json").write_text(json.dumps({"seed": 42, "note": "test manifest"}))
    return folder


def make_cfg(model, data_dir, out, **kw):
    values = dict(
        model_name_or_path=str(model),
        dataset_dir=str(data_dir),
        dataset="demo_train",
        eval_dataset="demo_val",
        output_dir=str(out),
        max_steps=6,
        eval_steps=2,
        logging_steps=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        torch_threads=1,
        seed=7,
    )
    values.update(kw)
    return load_config(None, values)


class ScriptedEvalLoss(TrainerCallback):
    """Replace validation losses by a script, so best step and early stopping are known in advance
    (on_evaluate runs before the Trainer compares the metric, like an Optuna pruning callback would)."""

    def __init__(self, losses):
        self.losses = list(losses)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_loss"] = self.losses.pop(0)


@pytest.fixture(scope="module")
def lora_run(tiny_model, data_dir, tmp_path_factory):
    """A small LoRA run: validation every 2 steps, scripted losses (best at step 4, early stop at 8)."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    cfg = make_cfg(
        tiny_model, data_dir, out, max_steps=12, early_stopping_patience=2, save_last=True, dataset="demo_train,chat"
    )
    summary = train(cfg, callbacks=[ScriptedEvalLoss([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])])
    return cfg, summary, out


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def same_tensors(a: dict, b: dict, tol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a)


@pytest.mark.parametrize("fixture, closer", [("tiny_model", "<|eot_id|>"), ("tiny_chatml_model", "<|im_end|>")])
def test_trainer_receives_masked_labels(request, fixture, closer, data_dir, tmp_path, monkeypatch):
    """The batches the Trainer trains on: prompt masked, every assistant turn + its closing token learned."""
    model_dir = request.getfixturevalue(fixture)
    seen = []
    original = train_mod.LoralabTrainer.training_step

    def spy(self, model, inputs, *args, **kwargs):
        seen.append({k: v.clone() for k, v in inputs.items()})
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(train_mod.LoralabTrainer, "training_step", spy)
    (tmp_path / "few.json").write_text(json.dumps(records(3)))  # dataset: file paths work as well as names
    cfg = make_cfg(
        model_dir,
        data_dir,
        tmp_path / "run",
        dataset=f"{data_dir / 'chat.json'},{tmp_path / 'few.json'}",
        eval_strategy="no",
        max_steps=1,
        group_by_length=False,
    )
    train(cfg)
    from loralab.models import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    batch = seen[0]
    assert batch["input_ids"].shape[0] == 4
    texts = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        assert (labels[mask == 0] == -100).all()  # padding is never learned
        texts.append(tokenizer.decode(ids[labels != -100]))
        prompt_part = tokenizer.decode(ids[(labels == -100) & (mask == 1)])
        assert "Say number" in prompt_part or "What is 2+2?" in prompt_part
    multi = next(t for t in texts if "It is 4." in t)
    assert "It is 6." in multi and multi.count(closer) == 2  # both assistant turns, each closed
    for text in texts:
        assert text.rstrip("\n").endswith(closer)
        assert "Say number" not in text and "What is" not in text and "user" not in text


def test_run_folder_best_and_last(lora_run, data_dir):
    cfg, summary, out = lora_run
    # Scripted validation: best at step 4, no improvement for 2 validations -> stopped at step 8 of 12.
    assert summary["best_step"] == 4 and summary["best_eval_loss"] == 2.0 and summary["steps"] == 8
    assert summary["stopped_early"] and summary["max_steps"] == 12
    assert abs(summary["best_eval_perplexity"] - 2.718281828**2) < 1e-6
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "config.yaml",
        "run_info.json",
        "demo_manifest.json",
        "metrics.jsonl",
        "train.log",
        "train_results.json",
        "training_loss.png",
        "training_eval_loss.png",
    ):
        assert (out / name).is_file(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # The run folder's adapter is the best checkpoint's; last/ is the last step's.
    assert same_tensors(adapter_tensors(out), adapter_tensors(out / "checkpoint-4"))
    assert same_tensors(adapter_tensors(out / "last"), adapter_tensors(out / "checkpoint-8"))
    assert not same_tensors(adapter_tensors(out), adapter_tensors(out / "last"))
    assert "= checkpoint-4 (best validation loss 2.0000 at step 4 of 8)" in (out / "train.log").read_text()
    import logging  # the run's log file is detached when train() returns (sweeps train many times)

    assert not [h for h in logging.getLogger().handlers if getattr(h, "baseFilename", "") == str(out / "train.log")]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == cfg.model_name_or_path
    results = json.loads((out / "train_results.json").read_text())
    assert results["examples"] == {"train": 33, "eval": 8} and results["overflow"]["train"]["truncated"] == 0
    assert results["tokens_per_s"] > 0 and 0 < results["padding_efficiency"] <= 1
    info = json.loads((out / "run_info.json").read_text())
    assert info["seed"] == 7 and "transformers" in info["libraries"]
    # metrics.jsonl: one line per training log and per validation.
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 9))
    assert all({"epoch", "learning_rate", "tokens_seen", "tokens_per_s"} <= r.keys() for r in train_lines)
    assert [r["step"] for r in lines if "eval_loss" in r] == [2, 4, 6, 8]
    assert all("eval_perplexity" in r for r in lines if "eval_loss" in r)
    assert train_lines[-1]["tokens_seen"] > train_lines[0]["tokens_seen"] > 0


def test_llamafactory_bookkeeping_files(lora_run):
    """What LLaMA-Factory writes beside the model, with its keys: its web UI and plot scripts read these."""
    cfg, summary, out = lora_run
    results = json.loads((out / "train_results.json").read_text())
    lf_keys = {
        "epoch",
        "total_flos",
        "train_loss",
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
    }
    assert lf_keys <= set(results) and results["steps"] == summary["steps"]  # beside loralab's own keys
    # the Trainer's own figure: steps run over its runtime (transformers 5.17 counts max_steps when early
    # stopping ended the run sooner)
    assert any(
        results["train_steps_per_second"] == pytest.approx(n / results["train_runtime"], rel=0.05)
        for n in (summary["steps"], summary["max_steps"])
    )
    all_results = json.loads((out / "all_results.json").read_text())  # the Trainer's metrics, as LLaMA-Factory's
    assert lf_keys <= set(all_results) and all(results[k] == v for k, v in all_results.items())
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == summary["steps"] and state["best_global_step"] == 4 and state["log_history"]
    lines = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["current_steps"] for r in train_lines] == list(range(1, summary["steps"] + 1))  # logging_steps=1
    assert {
        "current_steps",
        "total_steps",
        "loss",
        "lr",
        "epoch",
        "percentage",
        "elapsed_time",
        "remaining_time",
    } <= set(train_lines[0])
    assert train_lines[0]["total_steps"] == 12 and train_lines[0]["percentage"] == round(100 / 12, 2)
    ours = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["current_steps"], r["eval_loss"]) for r in lines if "eval_loss" in r] == [
        (r["step"], r["eval_loss"]) for r in ours if "eval_loss" in r
    ]
    assert all(r["elapsed_time"].count(":") == 2 for r in lines)  # H:MM:SS, as LLaMA-Factory's timedelta


def test_adapter_loads_in_peft_and_loralab(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loralab.models import load_model_and_tokenizer

    cfg, _, out = lora_run
    base = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path)
    PeftModel.from_pretrained(base, str(out))
    model, _ = load_model_and_tokenizer(
        load_config(None, {"model_name_or_path": cfg.model_name_or_path, "adapter_name_or_path": str(out)})
    )
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_refuses_to_overwrite_and_overwrites_when_asked(lora_run, tiny_model, data_dir, tmp_path):
    cfg, _, first = lora_run
    with pytest.raises(LoralabError, match="exists and is not empty"):
        train(make_cfg(tiny_model, data_dir, first))
    out = tmp_path / "again"  # a copy: other tests read the first run
    shutil.copytree(first, out)
    old_events = {p.name for p in (out / "tensorboard").glob("events.out.tfevents.*")}
    assert old_events and {"checkpoint-4", "checkpoint-8", "last"} <= {p.name for p in out.iterdir()}
    summary = train(make_cfg(tiny_model, data_dir, out, max_steps=2, overwrite_output_dir=True))
    # Nothing of the old run is left to mix with the new one (or to be resumed later).
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"] and not (out / "last").exists()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in lines) == 2 and summary["steps"] == 2
    events = {p.name for p in (out / "tensorboard").glob("events.out.tfevents.*")}
    assert events and not events & old_events
    assert "= checkpoint-4" not in (out / "train.log").read_text()


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under a folder (relative path -> bytes): what 'intact' means for a run."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class FailAtStep(TrainerCallback):
    """Stand-in for a run that fails part-way (out of memory, a kill): raises after step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            raise RuntimeError(f"failed at step {state.global_step}")


def test_a_failed_overwrite_never_loses_the_previous_run(lora_run, tiny_model, data_dir, tmp_path):
    _, _, first = lora_run
    out = tmp_path / "run"
    shutil.copytree(first, out)
    (out / "my_notes.txt").write_text("the user's own file: never moved or deleted")
    before = folder_state(out)
    # A failed start (an unknown template, a model that does not load, no data): nothing is touched.
    for bad in (
        {"template": "no-such-template"},
        {"model_name_or_path": str(tmp_path / "no-such-model")},
        {"dataset": "no_such_dataset"},
    ):
        with pytest.raises(LoralabError):
            train(make_cfg(tiny_model, data_dir, out, max_steps=2, overwrite_output_dir=True, **bad))
        assert folder_state(out) == before, bad
    # A failure before the new run's first checkpoint: the previous run is put back as it was.
    with pytest.raises(RuntimeError, match="failed at step 1"):
        train(make_cfg(tiny_model, data_dir, out, max_steps=4, overwrite_output_dir=True), callbacks=[FailAtStep(1)])
    assert folder_state(out) == before
    # After a checkpoint: the new run stays (resumable), the previous one waits in .previous_run/.
    with pytest.raises(RuntimeError, match="failed at step 3"):
        train(make_cfg(tiny_model, data_dir, out, max_steps=4, overwrite_output_dir=True), callbacks=[FailAtStep(3)])
    assert folder_state(out / ".previous_run") == {k: v for k, v in before.items() if k != "my_notes.txt"}
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"] and (out / "my_notes.txt").is_file()
    # Overwriting again replaces the unfinished attempt; failing early, it puts the finished run back.
    with pytest.raises(RuntimeError, match="failed at step 1"):
        train(make_cfg(tiny_model, data_dir, out, max_steps=4, overwrite_output_dir=True), callbacks=[FailAtStep(1)])
    assert folder_state(out) == before
    # A run that finishes replaces the previous one for good.
    train(make_cfg(tiny_model, data_dir, out, max_steps=2, overwrite_output_dir=True))
    assert not (out / ".previous_run").exists() and (out / "adapter_model.safetensors").is_file()
    assert (out / "my_notes.txt").read_bytes() == before["my_notes.txt"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_overflow_counts(tiny_model, data_dir):
    from loralab.data import load_conversations
    from loralab.models import load_tokenizer

    uncut = make_cfg(tiny_model, data_dir, "unused", cutoff_len=10**6)
    tokenizer = load_tokenizer(uncut)
    convs = load_conversations(uncut, "train")
    lengths = [len(encode_split(tokenizer, [c], uncut)[0][0]["input_ids"]) for c in convs]
    cutoff = sorted(lengths)[len(lengths) // 2]
    over = sum(n > cutoff for n in lengths)
    assert 0 < over < len(convs)
    kept, counts = encode_split(tokenizer, convs, make_cfg(tiny_model, data_dir, "x", cutoff_len=cutoff))
    assert counts["truncated"] + counts["no_labels"] == over and all(len(e["input_ids"]) <= cutoff for e in kept)
    assert counts["truncated"] > 0 and len(kept) == len(convs) - counts["no_labels"]
    dropping = make_cfg(tiny_model, data_dir, "x", cutoff_len=cutoff, overflow="drop")
    kept, counts = encode_split(tokenizer, convs, dropping)
    assert counts["dropped_too_long"] == over and len(kept) == len(convs) - over


def test_length_grouped_sampler_is_deterministic_and_tight():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(1000)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(1000)) and list(sampler) == first  # each index once, same order again
    assert list(LengthGroupedSampler(lengths, 8, seed=3)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first
    batches = [first[i : i + 8] for i in range(0, 1000, 8)]
    random_batches = [list(range(i, min(i + 8, 1000))) for i in range(0, 1000, 8)]
    assert padding_efficiency(lengths, batches) > 0.95 > padding_efficiency(lengths, random_batches)


def test_trainer_trains_in_length_grouped_order(tiny_model, data_dir, tmp_path, monkeypatch):
    """group_by_length: the batches the Trainer trains on are LengthGroupedSampler's, in its order."""
    from loralab.data import load_conversations
    from loralab.models import load_tokenizer

    seen = []
    original = train_mod.LoralabTrainer.training_step

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(sorted(inputs["attention_mask"].sum(dim=1).tolist()))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(train_mod.LoralabTrainer, "training_step", spy)
    cfg = make_cfg(tiny_model, data_dir, tmp_path / "run", eval_strategy="no", max_steps=3)
    train(cfg)
    examples, _ = encode_split(load_tokenizer(cfg), load_conversations(cfg, "train"), cfg)
    lengths = [len(e["input_ids"]) for e in examples]
    batches = LengthGroupedSampler(lengths, cfg.per_device_train_batch_size, seed=cfg.seed).batches()
    assert seen == [sorted(lengths[i] for i in batch) for batch in batches[:3]]


def test_lora_options_and_callbacks(tiny_model, data_dir, tmp_path):
    """rsLoRA + DoRA + target list in the adapter config; LoRA+ puts the B matrices at ratio * lr."""
    seen = {}

    class OptimizerSpy(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            seen["lrs"] = sorted({round(g["lr"], 9) for g in optimizer.param_groups if g["params"]})

    out = tmp_path / "dora"
    train(
        make_cfg(
            tiny_model,
            data_dir,
            out,
            max_steps=1,
            eval_strategy="no",
            lora_target="q_proj,v_proj",
            use_rslora=True,
            use_dora=True,
            loraplus_lr_ratio=16,
            lora_rank=4,
            lora_dropout=0.1,
        ),
        callbacks=[OptimizerSpy()],
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"] and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["lora_dropout"] == 0.1
    assert seen["lrs"] == [1e-2, 16e-2]


def test_full_finetuning_saves_a_model(tiny_model, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    summary = train(make_cfg(tiny_model, data_dir, out, finetuning_type="full", max_steps=2, eval_steps=2))
    assert summary["parameters"]["trainable"] == summary["parameters"]["total"]
    assert not (out / "adapter_config.json").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


def test_clear_errors(tiny_model, data_dir, tmp_path, monkeypatch):
    with pytest.raises(LoralabError, match=r"lora_target: qkv_proj is not a module .*valid names: all, .*q_proj"):
        train(make_cfg(tiny_model, data_dir, tmp_path / "a", lora_target="q_proj,qkv_proj"))
    with pytest.raises(LoralabError, match="no training example has a token to learn"):
        train(make_cfg(tiny_model, data_dir, tmp_path / "b", cutoff_len=5, overflow="truncate"))
    assert not any((tmp_path / "b").iterdir())  # nothing written: the corrected command needs no --overwrite
    with pytest.raises(LoralabError, match="model_name_or_path"):
        train(make_cfg(tmp_path / "no-such-model", data_dir, tmp_path / "c"))
    damaged = tmp_path / "damaged-model"
    shutil.copytree(tiny_model, damaged)
    (damaged / "model.safetensors").write_bytes((tiny_model / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(LoralabError, match="cannot read .*is the model folder complete"):
        train(make_cfg(damaged, data_dir, tmp_path / "g"))
    with pytest.raises(LoralabError, match="no complete checkpoint"):
        train(make_cfg(tiny_model, data_dir, tmp_path / "d", resume_from_checkpoint=True))
    if not torch.cuda.is_available():
        with pytest.raises(LoralabError, match="CUDA"):
            train(make_cfg(tiny_model, data_dir, tmp_path / "e", quantization_bit=4))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(train_mod.LoralabTrainer, "training_step", out_of_memory)
    with pytest.raises(LoralabError, match="per_device_train_batch_size: .*gradient_checkpointing"):
        train(make_cfg(tiny_model, data_dir, tmp_path / "f", max_steps=1))


def cli(*args, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "loralab.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **kw,
    )


def cli_args(model, data_dir, out, **kw):
    cfg = make_cfg(model, data_dir, out, **kw)
    keys = (
        "model_name_or_path",
        "dataset_dir",
        "dataset",
        "eval_dataset",
        "output_dir",
        "max_steps",
        "eval_steps",
        "logging_steps",
        "per_device_train_batch_size",
        "learning_rate",
        "torch_threads",
        "seed",
        "save_total_limit",
    )
    return [f"{k}={getattr(cfg, k)}" for k in keys]


# A training run that stops for an hour in checkpoint-4's on_save: the caller's callbacks run before
# loralab's own, which writes the completion marker, so the test can SIGKILL it "in the middle of saving".
PAUSE_BEFORE_MARKER = """
import json, sys, time
from transformers import TrainerCallback
from loralab.config import load_config
from loralab.train import train

class PauseBeforeMarker(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            time.sleep(3600)

train(load_config(None, json.loads(sys.argv[1])), callbacks=[PauseBeforeMarker()])
"""


def test_sigkill_during_save_then_resume_matches_uninterrupted(tiny_model, data_dir, tmp_path):
    """Kill the run while checkpoint-4 is being saved (its files written, completion marker not yet):
    --resume continues from checkpoint-2 with the same data order and schedule and ends like an
    uninterrupted run, at the same step, with the same weights."""
    settings = dict(max_steps=8, eval_steps=2, save_total_limit=5)
    reference = train(make_cfg(tiny_model, data_dir, tmp_path / "ref", **settings))
    out = tmp_path / "killed"
    args = ["train", *cli_args(tiny_model, data_dir, out, **settings)]
    values = json.dumps(make_cfg(tiny_model, data_dir, out, **settings).model_dump(mode="json"))
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSE_BEFORE_MARKER, values], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint-4" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, "training ended before the pause"
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / train_mod.COMPLETE_MARKER).exists()
    assert train_mod.find_resume_checkpoint(out).name == "checkpoint-2"

    with pytest.raises(LoralabError, match="--resume"):  # without --resume the folder is not touched
        train(make_cfg(tiny_model, data_dir, out, **settings))
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    assert "checkpoint-4: its save was interrupted" in resumed.stderr
    summary = json.loads((out / "train_results.json").read_text())
    assert summary["steps"] == reference["steps"] == 8 and summary["resumed_from"].endswith("checkpoint-2")
    assert summary["best_eval_loss"] == pytest.approx(reference["best_eval_loss"], abs=1e-5)
    assert same_tensors(adapter_tensors(out), adapter_tensors(tmp_path / "ref"), tol=1e-5)
    ref_lines = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got_lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got_lines] == [r["step"] for r in ref_lines]  # no duplicated steps after resume
    lf_log = [json.loads(x)["current_steps"] for x in (out / "trainer_log.jsonl").read_text().splitlines()]
    ref_lf_log = [
        json.loads(x)["current_steps"] for x in (tmp_path / "ref" / "trainer_log.jsonl").read_text().splitlines()
    ]
    assert lf_log == ref_lf_log  # LLaMA-Factory's log too
    for ref, got in zip(ref_lines, got_lines):
        for key in ("loss", "eval_loss", "learning_rate"):
            assert (key in ref) == (key in got) and got.get(key, 0) == pytest.approx(ref.get(key, 0), abs=1e-5)


def test_two_process_ddp(tiny_model, data_dir, tmp_path):
    out = tmp_path / "ddp"
    args = cli_args(tiny_model, data_dir, out, max_steps=4, eval_steps=2)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "loralab.cli", "train", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "train_results.json").read_text())
    # 32 examples, 2 processes x batch 4: one epoch is 4 steps (a single process would need 8).
    assert summary["steps"] == 4 and summary["epochs"] == pytest.approx(1.0)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3, 4]  # written by the main process only
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out))


def test_export_merged_logits_match_adapter(lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loralab.export import export

    cfg, _, run_dir = lora_run
    target = tmp_path / "merged"
    export_cfg = load_config(
        None,
        {"model_name_or_path": cfg.model_name_or_path, "adapter_name_or_path": str(run_dir), "export_dir": str(target)},
    )
    export(export_cfg)
    assert (target / "model.safetensors").is_file() and not (target / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert (
        tokenizer.chat_template
        and tokenizer.convert_tokens_to_ids("<|eot_id|>")
        in AutoModelForCausalLM.from_pretrained(target).generation_config.eos_token_id
    )
    ids = torch.tensor(
        [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "Say number 3"}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        ]
    )
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(target)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path)
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, str(run_dir))(ids).logits
    assert torch.allclose(merged, adapted, atol=1e-4)
    assert not torch.allclose(base_logits, adapted, atol=1e-3)  # the adapter does change the model
    with pytest.raises(LoralabError, match="export_dir: .* not empty"):
        export(export_cfg)
    export(export_cfg, overwrite=True)
    out = cli(
        "export",
        *[f"{k}={v}" for k, v in (("model_name_or_path", cfg.model_name_or_path), ("export_dir", str(tmp_path / "x")))],
    )
    assert out.returncode == 2 and "adapter_name_or_path" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_smollm2_adapter_names_builtin_base(tmp_path):
    """On the real SmolLM2: the adapter names its base as written (builtin:...), and loads back by it."""
    from loralab import data
    from loralab.models import load_model_and_tokenizer

    data.prepare(data.DEMO_SOURCE, output_dir=tmp_path / "data", seed=1, sample=60, split="40,20,0")
    out = tmp_path / "run"
    summary = train(
        load_config(
            None,
            {
                "dataset_dir": str(tmp_path / "data"),
                "output_dir": str(out),
                "max_steps": 2,
                "eval_dataset": "alpaca_data_val",
                "eval_steps": 2,
                "per_device_train_batch_size": 2,
                "cutoff_len": 256,
            },
        )
    )
    assert summary["steps"] == 2 and summary["best_eval_loss"] < 10
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "builtin:smollm2-135m-instruct"
    model, _ = load_model_and_tokenizer(load_config(None, {"adapter_name_or_path": str(out)}))
    assert type(model).__name__ == "PeftModelForCausalLM"


class PoisonWeights(TrainerCallback):
    """Make training diverge at a known step: a LoRA weight becomes NaN before that step runs."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_A" in n).fill_(float("nan"))


def test_divergence_stops_the_run_with_one_line_and_saves_no_nan(tiny_model, data_dir, tmp_path):
    out = tmp_path / "diverged"
    cfg = make_cfg(tiny_model, data_dir, out, max_steps=8, eval_steps=2, save_steps=2)
    with pytest.raises(LoralabError, match=r"^step 3: training diverged: .*not? .*finite.*lower learning_rate"):
        train(cfg, callbacks=[PoisonWeights(3)])
    saved = sorted(out.rglob("*.safetensors"))
    assert [p.parent.name for p in saved] == ["checkpoint-2"]  # from before the divergence; no final adapter
    assert all(torch.isfinite(t).all() for p in saved for t in adapter_tensors(p.parent).values())

    def no_constants(name):
        raise AssertionError(f"metrics.jsonl holds {name}, which is not JSON")

    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line, parse_constant=no_constants) for line in lines)
    assert train_mod.finite_or_none({"loss": float("nan"), "grad_norm": float("inf"), "step": 3}) == {
        "loss": None,
        "grad_norm": None,
        "step": 3,
    }


def test_generation_validation_logs_scores_at_each_validation(tiny_model, data_dir, tmp_path):
    """eval_generate_samples: replies of the model being trained, scored at every validation beside the loss;
    the replies are those of the saved checkpoint, and training goes on exactly as without the option."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from loralab import metrics
    from loralab.evaluate import load_examples
    from loralab.generate import Engine, GenerationSettings

    settings = dict(
        max_steps=4, eval_steps=2, max_new_tokens=6, lora_dropout=0.1, gradient_checkpointing=True, eval_max_samples=6
    )
    plain = train(make_cfg(tiny_model, data_dir, tmp_path / "plain", **settings))
    out = tmp_path / "gen"
    cfg = make_cfg(tiny_model, data_dir, out, eval_generate_samples=3, **settings)
    summary = train(cfg)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval_rougeL" in r]
    assert [r["step"] for r in scored] == [2, 4]  # at each validation
    for r in scored:
        assert {"eval_predict_rouge-l", "eval_exact_match", "eval_generate_seconds"} <= set(r)
        step_file = out / "eval_generation" / f"step-{r['step']}.jsonl"
        rows = [json.loads(line) for line in step_file.read_text().splitlines()]
        assert len(rows) == 3
        # the logged numbers are metrics.py's scores of the replies written beside them
        assert r["eval_rougeL"] == pytest.approx(
            sum(metrics.rouge_scores(x["predict"], x["label"])["rougeL"] for x in rows) / 3
        )
        assert r["eval_exact_match"] == pytest.approx(
            sum(metrics.exact_match(x["predict"], x["label"]) for x in rows) / 3
        )
    # The replies at step 4 are what the checkpoint saved at step 4 generates (same model, same engine).
    prompts, labels, _ = load_examples(cfg, "val")
    assert [x["label"] for x in rows] == labels[:3]
    engine = Engine(cfg, {"ckpt": str(out / "checkpoint-4")})
    replies = engine.generate(prompts[:3], GenerationSettings(max_new_tokens=6), adapter="ckpt")
    assert [c.text for c in replies] == [x["predict"] for x in rows]

    # Generating in between changed nothing in training (dropout, gradient checkpointing, cache state).
    assert [r["eval_loss"] for r in records if "eval_loss" in r] == [
        json.loads(line)["eval_loss"]
        for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
        if "eval_loss" in line
    ]
    assert same_tensors(adapter_tensors(out), adapter_tensors(tmp_path / "plain"))
    assert summary["train_loss"] == plain["train_loss"] and summary["examples"]["eval"] == 6

    gen = summary["eval_generation"]
    assert gen["samples"] == 3 and gen["last"]["step"] == 4 and gen["validations"] == 2
    assert gen["at_best_step"]["step"] == summary["best_step"]
    assert plain["eval_generation"] is None
    assert (out / "training_eval_generation.png").is_file()
    assert not (tmp_path / "plain" / "training_eval_generation.png").exists()
    events = EventAccumulator(str(next((out / "tensorboard").iterdir()).parent)).Reload()
    assert {"eval/rougeL", "eval/exact_match", "eval/loss"} <= set(events.Tags()["scalars"])
    from PIL import Image

    from loralab import report

    report.write_report(out)  # the report's curves get a third panel: ROUGE-L of the validation replies
    assert (
        Image.open(out / "report_files" / "losses.png").width
        > 1.4 * Image.open(report.plot_losses({"plain": tmp_path / "plain"}, tmp_path / "files")).width
    )
