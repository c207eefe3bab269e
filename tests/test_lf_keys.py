"""Every LLaMA-Factory 0.9.5 key is handled: honoured, renamed, or accepted with a one-line notice.

src/loralab/lf_keys.json is the key list recorded from LLaMA-Factory's argument dataclasses
(tests/fixtures/lf_reference/record_keys.py). A key that is in none of the three groups fails here.
"""

import logging
from pathlib import Path

import pytest

from loralab import lf_keys
from loralab.config import (
    LLAMAFACTORY_IGNORED_KEYS,
    LR_SCHEDULERS,
    OPTIMIZERS,
    Config,
    build_config,
    load_config,
)
from loralab.errors import LoralabError

ALL_KEYS = sorted(lf_keys.lf_defaults())
NOTICED = set(LLAMAFACTORY_IGNORED_KEYS) | set(lf_keys.NOTICES)


def test_the_key_list_is_llamafactorys():
    classes = lf_keys.lf_keys()
    assert set(classes) == {
        "ModelArguments",
        "DataArguments",
        "FinetuningArguments",
        "GeneratingArguments",
        "TrainingArguments",
        "EvaluationArguments",
    }
    assert len(ALL_KEYS) > 300 and {"packing", "neat_packing", "mask_history", "lr_scheduler_type"} <= set(ALL_KEYS)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_every_lf_key_is_honoured_or_noticed(key):
    honoured, renamed, noticed = key in Config.model_fields, key in lf_keys.RENAMED, key in NOTICED
    assert honoured + renamed + noticed == 1, f"`{key}`: honoured={honoured} renamed={renamed} noticed={noticed}"


def test_every_lf_key_at_its_lf_default_loads_with_notices(caplog):
    """One YAML with all ~350 keys at LLaMA-Factory's defaults loads; each ignored key says so in one line."""
    values = {k: v for k, v in lf_keys.lf_defaults().items() if k != "stage"}
    with caplog.at_level(logging.INFO, logger="loralab"):
        cfg = build_config(values, "all_lf_keys.yaml")
    for key in NOTICED & set(values):
        lines = [r.getMessage() for r in caplog.records if f"`{key}`" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0], key
    assert cfg.model_name_or_path == Config().model_name_or_path  # `null` = loralab's default


def test_renamed_key():
    assert load_config(None, {"early_stopping_steps": 3}).early_stopping_patience == 3


def test_honoured_keys_keep_llamafactorys_meaning():
    cfg = load_config(
        None,
        {
            "packing": True,
            "train_on_prompt": True,
            "mask_history": True,
            "additional_target": "embed_tokens,lm_head",
            "load_best_model_at_end": False,
            "quantization_method": "bnb",
            "optim": "sgd",
            "neftune_noise_alpha": 5,
        },
    )
    assert cfg.packing and cfg.train_on_prompt and cfg.mask_history and not cfg.load_best_model_at_end
    assert cfg.eval_dataset is None and cfg.do_predict is False  # LLaMA-Factory's defaults


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("lr_scheduler_type", "bogus", "linear, cosine, cosine_with_restarts"),
        ("optim", "adamw", "adamw_torch, adamw_torch_fused"),
        ("template", "qwen2", "llama3, llama4, qwen, qwen3"),
        ("quantization_method", "gptq", "'bnb', 'hqq' or 'eetq'"),
        ("stage", "dpo", "expected sft"),
    ],
)
def test_invalid_values_are_one_line_errors_at_config_time(key, value, allowed):
    with pytest.raises(LoralabError) as err:
        load_config(None, {key: value})
    assert f"`{key}`" in str(err.value) and allowed in str(err.value) and "\n" not in str(err.value)


def test_allowed_values_are_transformers_own():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}
    assert set(OPTIMIZERS) == {o.value for o in OptimizerNames}


def test_config_show_diff_lf_lists_unset_keys_that_differ(tmp_path):
    from typer.testing import CliRunner

    from loralab.cli import app

    path = tmp_path / "lf.yaml"
    path.write_text(
        "model_name_or_path: x\ndataset: d\noutput_dir: o\nlearning_rate: 1.0e-4\nlogging_steps: 5\ndo_sample: false\n"
    )
    out = CliRunner().invoke(app, ["config", "show", str(path), "--diff-lf", "max_new_tokens=1024"]).output
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert {"lr_scheduler_type", "cutoff_len", "eval_steps", "optim", "load_best_model_at_end"} <= set(rows)
    # keys the file or command line set mean the same in both, so they are not listed
    assert not {"learning_rate", "logging_steps", "do_sample", "max_new_tokens", "model_name_or_path"} & set(rows)
    assert "cosine" in rows["lr_scheduler_type"] and "linear" in rows["lr_scheduler_type"]
    assert "logging_steps (5)" in rows["eval_steps"]


def test_config_show_diff_lf_by_kind_of_file():
    """A predict file lists only what prediction uses, and that per_device_eval_batch_size is not the
    generation batch; an inference file only generation keys; a train file that batches are length-grouped."""
    from typer.testing import CliRunner

    from loralab.cli import app

    def rows(name, *overrides):
        fixture = Path(__file__).parent / "fixtures" / "lf_examples" / name
        out = CliRunner().invoke(app, ["config", "show", str(fixture), *overrides, "--diff-lf"]).output
        return {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}

    predict = rows("v095_extras_nlg_eval_llama3_lora_predict.yaml")
    assert {"max_new_tokens", "do_sample", "per_device_eval_batch_size"} <= set(predict)
    assert "unused: infer_batch_size=" in predict["per_device_eval_batch_size"]
    assert "1 (generation batch)" in predict["per_device_eval_batch_size"]  # the file's value, LLaMA-Factory's batch
    training = {"learning_rate", "lr_scheduler_type", "optim", "eval_strategy", "save_total_limit", "dataset"}
    assert not training & set(predict) and "group_by_length" not in predict
    inference = rows("v095_inference_qwen3_lora_sft.yaml")
    assert set(inference) == {"max_new_tokens", "do_sample"}
    train = rows("v095_train_lora_qwen3_lora_sft.yaml")
    assert "train_sampling_strategy: random" in train["group_by_length"] and "per_device_eval_batch_size" not in train
    both = rows("v095_train_lora_qwen3_lora_sft.yaml", "do_predict=true")  # trains, then predicts
    assert "group_by_length" in both and "(generation batch)" in both["per_device_eval_batch_size"]
