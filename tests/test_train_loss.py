"""Training memory: the chunked loss (train.chunked_lm_loss) gives the model's own cross-entropy and
gradients; batches split by max_tokens_per_pass (train.split_by_token_budget) keep whole rows; a short run
with both logs the losses and gradient norms of the Trainer's own one-pass, all-logits path."""

import json

import pytest
import torch
import transformers

from loralab import train as train_mod
from loralab.config import load_config
from loralab.train import chunked_lm_loss, split_by_token_budget, train


def lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    for name, param in model.named_parameters():  # B = 0 at init would hide the LoRA gradients of A
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def padded_batch(vocab: int) -> dict:
    """Three rows of different lengths: right padding, a masked prompt, labels only on the answers."""
    g = torch.Generator().manual_seed(1)
    lengths, prompts = [23, 9, 16], [10, 4, 7]
    input_ids = torch.randint(3, vocab, (3, 23), generator=g)
    attention_mask = torch.zeros(3, 23, dtype=torch.long)
    labels = torch.full((3, 23), -100)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        attention_mask[i, :n] = 1
        labels[i, p:n] = input_ids[i, p:n]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_batch(vocab: int) -> dict:
    """The same kind of sequences, packed as train.make_collator packs them (one row, position_ids)."""
    batch = padded_batch(vocab)
    features = [
        {"input_ids": ids[m == 1].tolist(), "labels": lab[m == 1].tolist()}
        for ids, lab, m in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])
    ]
    return transformers.DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)(features)


def loss_and_grads(model, batch, chunked: bool, num_items_in_batch, chunk_tokens: int = 5):
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if chunked:
        out = model(**inputs, output_hidden_states=True, logits_to_keep=torch.zeros(0, dtype=torch.long))
        assert out.logits.numel() == 0  # no logits were made by the model
        loss = chunked_lm_loss(
            out.hidden_states[-1], batch["labels"], model.get_output_embeddings(), num_items_in_batch, chunk_tokens
        )
    else:
        kwargs = {"num_items_in_batch": num_items_in_batch} if num_items_in_batch is not None else {}
        loss = model(**inputs, labels=batch["labels"], **kwargs).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("make_batch", [padded_batch, packed_batch])
@pytest.mark.parametrize("num_items_in_batch", [None, 57])
def test_chunked_loss_and_gradients_equal_the_models_own(tiny_model, make_batch, num_items_in_batch):
    """Several chunks (5 positions each) over padded or packed rows: same loss, same LoRA gradients, both
    normalisations (the mean over label tokens, and a sum over a whole accumulated batch's count)."""
    model = lora_model(tiny_model)
    batch = make_batch(model.config.vocab_size)
    plain, plain_grads = loss_and_grads(model, batch, False, num_items_in_batch)
    chunked, chunked_grads = loss_and_grads(model, batch, True, num_items_in_batch)
    assert torch.allclose(chunked, plain, rtol=1e-6, atol=1e-6)
    assert plain_grads.keys() == chunked_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_split_by_token_budget_keeps_rows_whole_and_trims_padding():
    batch = padded_batch(100)  # rows of 23, 9 and 16 tokens, padded to 23
    parts = split_by_token_budget(batch, 32)
    assert [p["input_ids"].shape for p in parts] == [(1, 23), (2, 16)]  # 2 x 23 > 32; 2 x 16 fits
    for key in batch:
        assert torch.equal(parts[0][key], batch[key][:1])
        assert torch.equal(parts[1][key], batch[key][1:, :16])
    assert [p["input_ids"].shape for p in split_by_token_budget(batch, 10)] == [(1, 23), (1, 9), (1, 16)]
    assert [p["input_ids"].shape for p in split_by_token_budget(batch, 69)] == [(3, 23)]


def run_losses(tiny_model, data_file, out, **settings) -> list[float]:
    cfg = load_config(
        None,
        {
            "model_name_or_path": str(tiny_model),
            "dataset": str(data_file),
            "eval_dataset": None,
            "eval_strategy": "no",
            "output_dir": str(out),
            "max_steps": 4,
            "logging_steps": 1,
            "per_device_train_batch_size": 3,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-2,
            "torch_threads": 1,
            "seed": 7,
            **settings,
        },
    )
    train(cfg)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for r in lines if "loss" in r for x in (r["loss"], r["grad_norm"])]


def test_training_logs_the_same_losses_as_the_trainers_own_loss(tiny_model, tmp_path, monkeypatch):
    """4 steps of 2 accumulated batches of 3, each split into passes of at most 40 tokens: the chunked
    loss (checked to run) logs the losses and gradient norms of the Trainer's own loss path (the model's
    cross-entropy over all logits, every batch in one pass)."""
    calls = []
    original = train_mod.chunked_lm_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    data_file = tmp_path / "records.json"  # varied lengths: padding and masked prompts of every size
    data_file.write_text(
        json.dumps(
            [
                {"instruction": f"Say {i}" + " please" * (i % 7), "output": f"It is {i}." + " Yes." * (i % 5)}
                for i in range(24)
            ]
        )
    )
    monkeypatch.setattr(train_mod, "chunked_lm_loss", counting)
    chunked = run_losses(tiny_model, data_file, tmp_path / "chunked", max_tokens_per_pass=40)
    assert len(calls) > 8  # every pass of every batch of every step; some batches were split
    monkeypatch.setattr(train_mod, "PLAIN_LM_HEAD_MODELS", set())  # the Trainer's own loss path
    n_chunked = len(calls)
    plain = run_losses(tiny_model, data_file, tmp_path / "plain", max_tokens_per_pass=0)
    assert len(calls) == n_chunked and len(plain) == 8  # loss and gradient norm of 4 steps
    assert chunked == pytest.approx(plain, rel=1e-4)
