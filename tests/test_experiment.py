"""`loralab run`: the whole experiment end to end on the tiny model, and stage reuse."""

import json
import subprocess
import sys

import pytest

from loralab import train
from loralab.experiment import run_experiment


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "loralab.cli", "run", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def experiment(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "exp"
    cfg = out.parent / "exp.yaml"
    cfg.write_text(
        f"model_name_or_path: {tiny_model}\n"
        "data_source: builtin:demo\ndata_sample: 60\ndata_split: 40,10,10\ndata_name: demo\n"
        f"dataset_dir: {out}/data\noutput_dir: {out}\n"
        "max_steps: 4\nper_device_train_batch_size: 8\neval_steps: 2\nsave_steps: 2\nlogging_steps: 1\n"
        "learning_rate: 1.0e-3\ncutoff_len: 96\nmax_new_tokens: 8\ninfer_batch_size: 10\n"
    )
    first = run(str(cfg))
    return cfg, out, first


def test_run_writes_every_stage(experiment):
    cfg, out, first = experiment
    assert first.returncode == 0, first.stderr[-3000:]
    assert "base" in first.stdout and "tuned" in first.stdout  # the side-by-side table
    manifest = json.loads((out / "data" / "demo_manifest.json").read_text())
    assert manifest["counts"]["actual"] == {"train": 40, "val": 10, "test": 10}
    assert (out / "train" / "adapter_config.json").is_file() and (out / "train" / "train_results.json").is_file()
    comparison = json.loads((out / "eval" / "comparison.json").read_text())
    assert set(comparison["models"]) == {"base", "tuned"}
    for name in ("base", "tuned"):
        lines = (out / "eval" / name / "generated_predictions.jsonl").read_text().splitlines()
        assert len(lines) == 10 and set(json.loads(lines[0])) >= {"prompt", "predict", "label"}
    metric = comparison["models"]["tuned"]["metrics"]["predict_rouge-l"]
    assert metric["ci_low"] <= metric["value"] <= metric["ci_high"]
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert json.loads((out / "stages.json").read_text()).keys() == {"train", "eval"}


def test_rerun_reuses_finished_stages(experiment):
    cfg, out, first = experiment
    assert first.returncode == 0, first.stderr[-3000:]
    adapter = out / "train" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    again = run(str(cfg))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "prepare: reusing" in again.stderr and "train: reusing" in again.stderr and "eval: reusing" in again.stderr
    assert adapter.stat().st_mtime_ns == before
    # A changed training setting is not silently recomputed over the old results.
    changed = run(str(cfg), "learning_rate=5e-4")
    assert changed.returncode == 2 and "--force" in changed.stderr and "Traceback" not in changed.stderr
    assert adapter.stat().st_mtime_ns == before


class TrainCalled(Exception):
    pass


def test_cut_off_training_resumes_only_from_a_complete_checkpoint(tiny_model, tmp_path, monkeypatch):
    """train/ with a checkpoint cut off mid-save starts over; with a complete one it resumes (the rule of
    train and sweep), instead of failing with flags `loralab run` does not have."""
    seen = []

    def record(cfg, callbacks=None):
        seen.append((cfg.resume_from_checkpoint, cfg.overwrite_output_dir))
        raise TrainCalled

    monkeypatch.setattr(train, "train", record)
    values = {
        "model_name_or_path": str(tiny_model),
        "data_source": "builtin:demo",
        "data_sample": 30,
        "data_split": "20,5,5",
        "data_name": "demo",
        "dataset_dir": str(tmp_path / "data"),
        "output_dir": str(tmp_path / "exp"),
    }
    overrides = [f"{k}={v}" for k, v in values.items()]
    half = tmp_path / "exp" / "train" / "checkpoint-2"
    half.mkdir(parents=True)
    (half / "adapter_model.safetensors").write_text("cut off")
    with pytest.raises(TrainCalled):
        run_experiment(None, overrides)
    (half / train.COMPLETE_MARKER).write_text("{}")
    with pytest.raises(TrainCalled):
        run_experiment(None, overrides)
    assert seen == [(None, True), (True, False)]
