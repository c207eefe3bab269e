"""Config, CLI, templates and the model loader on the tiny model."""

import subprocess
import sys

import pytest

from loralab.config import load_config
from loralab.errors import LoralabError
from loralab.models import load_model_and_tokenizer, load_tokenizer
from loralab.templates import apply_template, encode_for_training, encode_prompt, render, stop_token_ids

LF_TRAIN_YAML = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null

### eval
eval_dataset: alpaca_en_demo
val_size: 0.1
per_device_eval_batch_size: 1
eval_strategy: steps
eval_steps: 500
"""

LF_INFER_YAML = """\
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
template: llama3
infer_backend: huggingface  # choices: [huggingface, vllm, sglang]
trust_remote_code: true
"""


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "loralab.cli", *args], capture_output=True, text=True, **kw)


def test_llamafactory_yaml_loads(tmp_path):
    for text in (LF_TRAIN_YAML, LF_INFER_YAML):
        path = tmp_path / "lf.yaml"
        path.write_text(text)
        cfg = load_config(path)
        assert cfg.model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
        assert cfg.template == "llama3"
    assert cfg.infer_backend == "huggingface"
    cfg = load_config(tmp_path / "lf.yaml", ["learning_rate=2e-4", "lora_rank=16", "lora_target=q_proj,v_proj"])
    assert cfg.learning_rate == 2e-4 and cfg.lora_rank == 16 and cfg.target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("lora_rnak=8", "unknown key `lora_rnak`; did you mean `lora_rank`?"),
        ("lora_rank=-1", "`lora_rank`"),
        ("learning_rate=abc", "`learning_rate`"),
        ("finetuning_type=qlora", "`finetuning_type`"),
        ("data_split=1,2", "data_split"),
        ("novel", "expected key=value"),
    ],
)
def test_bad_keys_are_one_line_errors(override, expected):
    with pytest.raises(LoralabError) as err:
        load_config(None, [override])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_stage_tags_decide_which_keys_matter():
    from loralab import config

    assert set(config.STAGE_OF_KEY) <= set(config.FIELDS)  # every tag names a real key
    assert set(config.STAGE_OF_KEY.values()) <= set(config.STAGES)
    every = [config.TRAIN_KEYS, config.EVAL_KEYS, config.keys_of("speed", "files", "serve")]
    assert sum(len(s) for s in every) == len(config.FIELDS) and set().union(*every) == set(config.FIELDS)
    # The validation batch size changes the validation loss that picks the best checkpoint: a training
    # setting for `loralab run` and for a sweep alike; the thread count changes no result.
    assert "per_device_eval_batch_size" in config.TRAIN_KEYS
    assert "per_device_eval_batch_size" not in config.RESULT_NEUTRAL_KEYS
    assert "torch_threads" in config.RESULT_NEUTRAL_KEYS and "torch_threads" not in config.TRAIN_KEYS | config.EVAL_KEYS
    assert "max_new_tokens" in config.EVAL_KEYS and "test_dataset" in config.NOT_SEARCHABLE_KEYS
    # Validation subsets pick the best checkpoint (train); the test subset only changes the final scores.
    assert {"eval_max_samples", "eval_generate_samples"} <= config.TRAIN_KEYS
    assert "test_max_samples" in config.EVAL_KEYS and "test_max_samples" in config.NOT_SEARCHABLE_KEYS
    assert config.did_you_mean("lora_rnak", config.FIELDS) == "; did you mean `lora_rank`?"
    assert config.did_you_mean("zzz", config.FIELDS) == ""


def test_cli_config_show_and_errors(tmp_path):
    out = cli("config", "show", "lora_rank=4")
    assert out.returncode == 0, out.stderr
    assert "lora_rank: 4" in out.stdout
    bad = cli("config", "show", "lora_rank=abc")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error:") and "lora_rank" in bad.stderr
    missing = cli("config", "show", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    broken = cli("config", "show", str(tmp_path / "broken.yaml"))
    assert broken.returncode == 2 and "line" in broken.stderr and "Traceback" not in broken.stderr
    version = cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("loralab ")


CONVERSATION = [
    {"role": "system", "content": "Be brief. "},
    {"role": "user", "content": " What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


def test_missing_extra_is_named_in_one_line(tmp_path):
    # As if fastapi were not installed: `import fastapi` fails (a None entry in sys.modules).
    script = (
        "import sys; sys.modules['fastapi'] = None; sys.argv = ['loralab', 'api']; from loralab.cli import main; main()"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: this command needs fastapi, which is not installed: pip install 'loralab[serve]'"
    )


def test_builtin_llama3_matches_meta_template(tiny_model):
    # Meta's template trims each message; LLaMA-Factory's llama3 (loralab's) does not: same ids for trimmed text.
    conversation = [{**m, "content": m["content"].strip()} for m in CONVERSATION]
    tokenizer = load_tokenizer(load_config(None, {"model_name_or_path": str(tiny_model)}))
    meta_train = tokenizer(render(tokenizer, conversation), add_special_tokens=False)["input_ids"]
    meta_prompt = encode_prompt(tokenizer, conversation[:2])
    apply_template(tokenizer, "llama3")
    assert encode_for_training(tokenizer, conversation, 4096)["input_ids"] == meta_train
    assert encode_prompt(tokenizer, conversation[:2]) == meta_prompt


@pytest.mark.parametrize("fixture, closer", [("tiny_model", "<|eot_id|>"), ("tiny_chatml_model", "<|im_end|>")])
def test_training_labels_mask_prompt_and_keep_turn_end(request, fixture, closer):
    path = request.getfixturevalue(fixture)
    tokenizer = load_tokenizer(load_config(None, {"model_name_or_path": str(path)}))
    encoded = encode_for_training(tokenizer, CONVERSATION, 4096)
    learned = [i for i, label in zip(encoded["input_ids"], encoded["labels"]) if label != -100]
    text = tokenizer.decode(learned)
    # Both assistant turns (multi-turn), each with its closing token; no prompt text.
    assert "4" in text and "It is 6." in text and text.count(closer) == 2
    assert "What is" not in text and "Be brief" not in text and "assistant" not in text
    assert tokenizer.convert_tokens_to_ids(closer) in stop_token_ids(tokenizer)
    # Truncation keeps only what fits; drop mode drops.
    first_label = next(i for i, label in enumerate(encoded["labels"]) if label != -100)
    cut = first_label + 2
    truncated = encode_for_training(tokenizer, CONVERSATION, cut, overflow="truncate")
    assert truncated["input_ids"] == encoded["input_ids"][:cut] and truncated["labels"] == encoded["labels"][:cut]
    assert encode_for_training(tokenizer, CONVERSATION, cut, overflow="drop") is None
    assert (
        encode_for_training(tokenizer, CONVERSATION, first_label, overflow="truncate") is None
    )  # nothing left to learn


def test_template_errors(tiny_chatml_model):
    cfg = load_config(None, {"model_name_or_path": str(tiny_chatml_model), "template": "llama3"})
    with pytest.raises(LoralabError, match="needs the special tokens"):
        load_tokenizer(cfg)
    with pytest.raises(LoralabError, match="`template`.*expected one of llama3, llama4, qwen"):  # at config time
        load_config(None, {"model_name_or_path": str(tiny_chatml_model), "template": "bogus"})


def test_model_loader_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, expected in [
        ("meta-llama/Llama-3.2-1B-Instruct", "cannot load"),
        (str(tmp_path / "missing.gguf"), "not found"),
        (str(tmp_path), "no config.json"),
        ("builtin:gpt5", "unknown builtin model"),
    ]:
        with pytest.raises(LoralabError, match=expected):
            load_tokenizer(load_config(None, {"model_name_or_path": name}))


def test_quantization_needs_cuda(tiny_model):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    from loralab.models import load_model

    with pytest.raises(LoralabError, match="CUDA"):
        load_model(load_config(None, {"model_name_or_path": str(tiny_model), "quantization_bit": 4}))


def test_loads_tiny_model(tiny_model):
    model, tokenizer = load_model_and_tokenizer(load_config(None, {"model_name_or_path": str(tiny_model)}))
    assert model.config.num_hidden_layers == 2 and tokenizer.pad_token is not None


@pytest.mark.slow
def test_builtin_smollm2_converts_and_chats():
    cfg = load_config(None, {})
    model, tokenizer = load_model_and_tokenizer(cfg)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    import torch

    out = model.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=stop_token_ids(tokenizer)
    )
    assert "Paris" in tokenizer.decode(out[0, len(ids) :])
