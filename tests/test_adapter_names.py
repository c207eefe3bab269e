"""Adapter folders named the way users name them (dots, spaces, non-ASCII, the same name twice) work in
every command: peft only ever sees safe internal names, users only ever see theirs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loralab.config import load_config
from loralab.export import export
from loralab.generate import Engine, GenerationSettings
from loralab.models import adapter_display_names, peft_adapter_names
from loralab.testing import make_random_adapter

LORALAB = Path(sys.executable).with_name("loralab")
HELLO = [{"role": "user", "content": "What is the capital of France?"}]
FOLDER_NAMES = ["llama3.2-1b-lora", "run v1.0", "адаптер-ü"]


@pytest.fixture(scope="module")
def odd_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tmp.Xy12")  # like `mktemp -d`: a dot in a parent folder too
    return {name: make_random_adapter(tiny_model, root / name, seed=i + 1) for i, name in enumerate(FOLDER_NAMES)}


def run(*args, cwd, stdin=None):
    env = dict(os.environ, PYTHONIOENCODING="utf-8", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [str(LORALAB), *args], input=stdin, capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_display_names_are_unique_and_internal_names_are_safe(tmp_path):
    paths = [str(tmp_path / "a" / "lora"), str(tmp_path / "b" / "lora"), str(tmp_path / "llama3.2-1b")]
    assert list(adapter_display_names(paths)) == ["a/lora", "b/lora", "llama3.2-1b"]
    assert list(adapter_display_names(["runs/exp1/"])) == ["exp1"]
    internal = peft_adapter_names(["llama3.2-1b", "run v1.0", "адаптер", "x" * 300])
    assert len(set(internal.values())) == 4
    assert all(n.isascii() and n.replace("_", "").isalnum() for n in internal.values())


def test_engine_serves_each_adapter_under_the_users_name(tiny_model, odd_adapters):
    cfg = load_config(
        None,
        {
            "model_name_or_path": str(tiny_model),
            "torch_threads": 1,
            "adapter_name_or_path": ",".join(str(p) for p in odd_adapters.values()),
        },
    )
    engine = Engine(cfg)
    assert engine.adapter_names == FOLDER_NAMES
    settings = GenerationSettings(max_new_tokens=8)
    replies = {name: engine.generate([HELLO], settings, adapter=name)[0].text for name in [None, *FOLDER_NAMES]}
    assert len(set(replies.values())) == 4  # each adapter is really applied, and the base differs from all


def test_predict_eval_chat_and_export_with_odd_folder_names(tiny_model, odd_adapters, tmp_path):
    records = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "cfg.yaml").write_text(
        f"model_name_or_path: {tiny_model}\nmax_new_tokens: 4\noutput_dir: out\ntorch_threads: 1\n"
    )
    dotted, spaced, cyrillic = (str(odd_adapters[n]) for n in FOLDER_NAMES)

    out = run("predict", "cfg.yaml", f"adapter_name_or_path={dotted}", "--data", "d.json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        len((tmp_path / "out" / "predict-d-llama3.2-1b-lora" / "generated_predictions.jsonl").read_text().splitlines())
        == 3
    )

    out = run(
        "eval",
        "cfg.yaml",
        f"adapter_name_or_path={spaced}",
        "--data",
        "d.json",
        "--compare-base",
        "--n-boot",
        "20",
        "--output-dir",
        "cmp",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "cmp" / "run v1.0" / "metrics.json").read_text())["adapter"] == spaced

    out = run("chat", "cfg.yaml", f"adapter_name_or_path={cyrillic}", cwd=tmp_path, stdin="hello\n/exit\n")
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]

    cfg = load_config(
        None,
        {
            "model_name_or_path": str(tiny_model),
            "adapter_name_or_path": dotted,
            "export_dir": str(tmp_path / "merged v1.0"),
        },
    )
    assert (export(cfg) / "config.json").is_file()


def test_api_adapter_names_with_dots(tiny_model, odd_adapters):
    openai = pytest.importorskip("openai")
    from test_api import free_port, wait_until_healthy

    port = free_port()
    env = dict(os.environ, API_PORT=str(port), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("API_KEY", None)
    proc = subprocess.Popen(
        [
            str(LORALAB),
            "api",
            f"model_name_or_path={tiny_model}",
            "max_new_tokens=6",
            "torch_threads=1",
            f"adapter_name_or_path={odd_adapters['run v1.0']}",
            "--adapter",
            f"llama3.2-tuned={odd_adapters['llama3.2-1b-lora']}",
            "--adapter",
            f"адаптер={odd_adapters['адаптер-ü']}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(proc, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        names = [m.id for m in client.models.list()]
        assert names == [str(tiny_model), "run v1.0", "llama3.2-tuned", "адаптер"]
        for name in names:
            r = client.chat.completions.create(model=name, messages=HELLO)
            assert r.model == name and r.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
