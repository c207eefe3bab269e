"""bench/gpu_speed.py, the GPU speed benchmark, runs end to end on a CPU with tiny sizes (its --tiny mode)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_speed_runs_on_a_cpu_with_tiny_sizes(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "gpu_speed.py"),
            "--tiny",
            "--skip-continuous",
            "--data",
            str(tmp_path / "absent.json"),
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    training = result["training"]
    assert training["loralab_defaults"]["tokens_per_s"] > 0 and training["hf_trainer_peft_baseline"]["tokens_per_s"] > 0
    assert training["speedup"] > 0 and training["loralab_defaults"]["mfu_of_measured_matmul"] > 0
    generation = result["generation"]
    assert set(generation) == {
        "engine_6_rows",
        "engine_2_rows",
        "engine_single_stream",
        "hf_generate_batch_2",
        "hf_generate_batch_4",
    }
    # fp32 on a CPU: transformers' generate gives exactly the engine's greedy replies
    assert generation["hf_generate_batch_2"]["identical_to_engine"] == 1.0
    assert all(row["generated_tokens"] > 0 for row in generation.values())
    assert "speedup" in proc.stdout and "engine_6_rows" in proc.stdout
