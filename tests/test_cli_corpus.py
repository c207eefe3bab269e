"""The CLI's bad-input corpus: malformed invocations, config files and data files.

Each case runs `loralab.cli.main()` in this process (milliseconds instead of a second of imports per
case) and asserts: the exit status, a one-line `error: ...` naming what is wrong, no exception other
than SystemExit (nothing a traceback would be printed for), and every input file byte-identical
afterwards. A few cases at the end run the real command in a subprocess.
"""

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ALPACA = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(20)]


def laughs(levels: int = 9) -> str:
    """A "billion laughs" YAML: each alias repeats the one before nine times (1 KB -> 9**levels values)."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nlora_target: *l{levels - 1}\n"


# The same in one command-line value (YAML flow style): 9**7 values from 300 characters.
LAUGHS_FLOW = (
    "[&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1], "
    + ", ".join(f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 8))
    + "]"
)


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


SURROGATE = "\\ud800"  # as JSON writes a lone surrogate: an escape
RECORDS = [json.dumps(r) for r in ALPACA]


def with_record(record_json: str) -> str:
    return "[" + ", ".join([*RECORDS[:5], record_json, *RECORDS[5:]]) + "]"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model) -> Path:
    """The corpus's files: broken configs and data files next to good ones."""
    d = tmp_path_factory.mktemp("cli-corpus")
    files = {
        "good.yaml": "lora_rank: 8\nmax_steps: 2\n",
        "typo.yaml": "lora_rnk: 8\n",
        "bad-value.yaml": "lora_rank: abc\n",
        "zero-rank.yaml": "lora_rank: 0\n",
        "inf-lr.yaml": "learning_rate: .inf\n",
        "nan-dropout.yaml": "lora_dropout: .nan\n",
        "invalid.yaml": "lora_rank: [8\n",
        "list.yaml": "- lora_rank\n- 8\n",
        "both-precisions.yaml": "bf16: true\nfp16: true\n",
        "unknown-method.yaml": "finetuning_type: qlora\n",
        "tab-indented.yaml": "model:\n\tname: x\n",
        "data/good.json": json.dumps(ALPACA),
        "data/invalid.json": '[{"instruction": "a", "output": "b"',
        "data/not-a-list.json": '{"instruction": "a", "output": "b"}',
        "data/numbers.json": "[1, 2, 3]",
        "data/empty-list.json": "[]",
        "data/empty.json": "",
        "data/no-answers.json": json.dumps([{"instruction": f"q{i}", "input": "", "output": ""} for i in range(20)]),
        "data/bad-line.jsonl": '{"instruction": "a", "output": "b"}\n{oops\n',
        "data/unknown-format.json": json.dumps([{"question": "a", "reply": "b"}]),
        "data/dataset_info.json": json.dumps(
            {"good": {"file_name": "good.json"}, "broken": {"file_name": "gone.json"}}
        ),
        "bad-info/dataset_info.json": "{not json",
        "predictions.jsonl": '{"predict": "a"}\n',
        "out-file": "I am a file, not a folder\n",
        # Deep nesting at several depths and places; lone surrogates in several fields.
        "data/deep-1100.json": nested(1_100),
        "data/deep-100000.json": nested(100_000),
        "data/deep-record.json": with_record(
            '{"instruction": "q", "input": "", "output": "a", "meta": ' + nested(5_000) + "}"
        ),
        "data/deep-output.json": with_record('{"instruction": "q", "input": "", "output": ' + nested(900) + "}"),
        "data/deep-line.jsonl": RECORDS[0] + "\n" + nested(3_000) + "\n",
        "deep-info/dataset_info.json": '{"x": ' + nested(2_000) + "}",
        "data/surrogate-instruction.json": with_record(
            f'{{"instruction": "q{SURROGATE}", "input": "", "output": "a"}}'
        ),
        "data/surrogate-output.json": with_record(f'{{"instruction": "q", "input": "", "output": "{SURROGATE}"}}'),
        "data/surrogate-extra.json": with_record(
            f'{{"instruction": "q", "input": "", "output": "a", "x": ["{SURROGATE}"]}}'
        ),
        "data/surrogate-low.jsonl": "\n".join(
            RECORDS[:3] + ['{"instruction": "q", "input": "\\udfff", "output": "a"}']
        ),
        "data/surrogate-sharegpt.json": json.dumps(
            [
                {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
                for i in range(9)
            ]
        )[:-1]
        + ', {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "\\udbff"}]}]',
        "laughs.yaml": laughs(),
        "laughs-small.yaml": laughs(6),  # 531,441 values: still far more than a config holds
        "huge.yaml": "# padding\n" * 150_000 + "lora_rank: 8\n",
        "rank-huge.yaml": "lora_rank: 1.0e12\n",
    }
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage\x80")
    (d / "data/binary.json").write_bytes(b"\xff\xfe\x00\x80")
    existing = d / "prepared"
    existing.mkdir()
    (existing / "alpaca_data_train.json").write_text("[]\n")  # an earlier prepare's output: must survive
    (d / "a-folder.yaml").mkdir()
    # An adapter whose weights file was cut short (a copy interrupted, a full disk).
    from loralab.testing import make_random_adapter

    cut = make_random_adapter(tiny_model, d / "cut-adapter", 1) / "adapter_model.safetensors"
    cut.write_bytes(cut.read_bytes()[:-100])
    return d


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root (to prove nothing the user had was changed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# (id, arguments, environment, exit status, text the error line must contain)
# {d}: the corpus folder, {model}: the tiny model.
CASES = [
    # configuration files and key=value overrides
    ("config-missing", ["config", "show", "{d}/nope.yaml"], {}, 2, "config file not found"),
    ("config-is-a-folder", ["config", "show", "{d}/a-folder.yaml"], {}, 2, "a-folder.yaml"),
    ("config-invalid-yaml", ["config", "show", "{d}/invalid.yaml"], {}, 2, "invalid YAML at line"),
    ("config-tab-indented", ["config", "show", "{d}/tab-indented.yaml"], {}, 2, "invalid YAML"),
    ("config-top-level-list", ["config", "show", "{d}/list.yaml"], {}, 2, "expected a mapping"),
    ("config-binary", ["config", "show", "{d}/binary.yaml"], {}, 2, "binary.yaml"),
    ("config-typo", ["config", "show", "{d}/typo.yaml"], {}, 2, "did you mean `lora_rank`"),
    ("config-bad-type", ["config", "show", "{d}/bad-value.yaml"], {}, 2, "lora_rank"),
    ("config-zero-rank", ["config", "show", "{d}/zero-rank.yaml"], {}, 2, "lora_rank"),
    ("config-inf-learning-rate", ["config", "show", "{d}/inf-lr.yaml"], {}, 2, "learning_rate"),
    ("config-nan-dropout", ["config", "show", "{d}/nan-dropout.yaml"], {}, 2, "lora_dropout"),
    ("config-both-precisions", ["config", "show", "{d}/both-precisions.yaml"], {}, 2, "bf16 and fp16"),
    ("config-unknown-method", ["config", "show", "{d}/unknown-method.yaml"], {}, 2, "finetuning_type"),
    ("override-nan-learning-rate", ["config", "show", "learning_rate=nan"], {}, 2, "learning_rate"),
    ("override-inf-learning-rate", ["config", "show", "learning_rate=inf"], {}, 2, "learning_rate"),
    ("override-huge-learning-rate", ["config", "show", "learning_rate=1e400"], {}, 2, "learning_rate"),
    ("override-typo", ["config", "show", "lora_rnak=8"], {}, 2, "did you mean `lora_rank`"),
    ("override-empty-key", ["config", "show", "=8"], {}, 2, "key=value"),
    ("stray-argument", ["config", "show", "{d}/good.yaml", "lora_rank"], {}, 2, "expected key=value"),
    ("override-nan-split", ["config", "show", "data_split=nan,1,1"], {}, 2, "data_split"),
    ("override-port-range", ["config", "show", "api_port=70000"], {}, 2, "api_port"),
    ("config-billion-laughs", ["config", "show", "{d}/laughs.yaml"], {}, 2, "expands to more than"),
    ("config-million-laughs", ["config", "show", "{d}/laughs-small.yaml"], {}, 2, "expands to more than"),
    ("override-laughs", ["config", "show", "lora_target=" + LAUGHS_FLOW], {}, 2, "expands to more than"),
    ("config-huge-file", ["config", "show", "{d}/huge.yaml"], {}, 2, "a config file is expected under"),
    ("config-rank-huge", ["config", "show", "{d}/rank-huge.yaml"], {}, 2, "lora_rank"),
    ("override-rank-huge", ["config", "show", "lora_rank=1000000000000"], {}, 2, "lora_rank"),
    ("override-rank-over-limit", ["config", "show", "lora_rank=65537"], {}, 2, "lora_rank"),
    (
        "train-rank-wider-than-the-model",
        [
            "train",
            "model_name_or_path={model}",
            "dataset={d}/data/good.json",
            "eval_dataset=null",
            "lora_rank=4096",
            "output_dir={d}/../rank-run",
            "max_steps=1",
        ],
        {},
        2,
        "lora_rank: 4096 is larger than the widest layer",
    ),
    # train: config and data are checked before torch is imported
    ("train-typo", ["train", "{d}/typo.yaml"], {}, 2, "did you mean"),
    ("train-inf-learning-rate", ["train", "learning_rate=inf"], {}, 2, "learning_rate"),
    ("train-missing-dataset", ["train", "dataset=nope", "dataset_dir={d}/data"], {}, 2, "dataset `nope`"),
    (
        "train-missing-file-in-info",
        ["train", "dataset=broken", "dataset_dir={d}/data", "eval_dataset=null"],
        {},
        2,
        "gone.json",
    ),
    ("train-invalid-json", ["train", "dataset={d}/data/invalid.json", "eval_dataset=null"], {}, 2, "invalid JSON"),
    ("train-numbers", ["train", "dataset={d}/data/numbers.json", "eval_dataset=null"], {}, 2, "numbers.json"),
    ("train-empty-list", ["train", "dataset={d}/data/empty-list.json", "eval_dataset=null"], {}, 2, "no records"),
    ("train-binary-data", ["train", "dataset={d}/data/binary.json", "eval_dataset=null"], {}, 2, "not UTF-8"),
    ("train-bad-dataset-info", ["train", "dataset=x", "dataset_dir={d}/bad-info"], {}, 2, "invalid JSON"),
    (
        "train-missing-eval",
        ["train", "dataset={d}/data/good.json", "eval_dataset=nope", "dataset_dir={d}/data"],
        {},
        2,
        "dataset `nope`",
    ),
    # prepare
    ("prepare-missing-source", ["prepare", "{d}/nope.json", "-o", "{d}/out1"], {}, 2, "file not found"),
    (
        "prepare-nan-split",
        ["prepare", "{d}/data/good.json", "-o", "{d}/out2", "--split", "nan,0.5,0.5"],
        {},
        2,
        "--split",
    ),
    ("prepare-inf-split", ["prepare", "{d}/data/good.json", "-o", "{d}/out3", "--split", "inf,1,1"], {}, 2, "--split"),
    (
        "prepare-negative-split",
        ["prepare", "{d}/data/good.json", "-o", "{d}/out4", "--split", "-1,1,1"],
        {},
        2,
        "--split",
    ),
    ("prepare-two-part-split", ["prepare", "{d}/data/good.json", "-o", "{d}/out5", "--split", "1,2"], {}, 2, "--split"),
    ("prepare-word-split", ["prepare", "{d}/data/good.json", "-o", "{d}/out6", "--split", "a,b,c"], {}, 2, "--split"),
    (
        "prepare-empty-splits",
        ["prepare", "{d}/data/good.json", "-o", "{d}/out7", "--split", "0.01,0.01,0.01"],
        {},
        2,
        "would be empty",
    ),
    (
        "prepare-too-many",
        ["prepare", "{d}/data/good.json", "-o", "{d}/out8", "--split", "100,10,10"],
        {},
        2,
        "only 20 usable",
    ),
    ("prepare-no-answers", ["prepare", "{d}/data/no-answers.json", "-o", "{d}/out9"], {}, 2, "no usable record"),
    ("prepare-output-is-a-file", ["prepare", "{d}/data/good.json", "-o", "{d}/out-file"], {}, 2, "is a file"),
    ("prepare-would-overwrite", ["prepare", "{d}/data/good.json", "-o", "{d}/prepared"], {}, 2, "--overwrite"),
    ("prepare-sample-zero", ["prepare", "{d}/data/good.json", "-o", "{d}/out10", "--sample", "0"], {}, 2, "--sample"),
    (
        "prepare-sample-negative",
        ["prepare", "{d}/data/good.json", "-o", "{d}/out11", "--sample", "-3"],
        {},
        2,
        "--sample",
    ),
    (
        "prepare-max-tokens-alone",
        ["prepare", "{d}/data/good.json", "-o", "{d}/out12", "--max-tokens", "5"],
        {},
        2,
        "--tokenizer",
    ),
    ("prepare-invalid-json", ["prepare", "{d}/data/invalid.json", "-o", "{d}/out13"], {}, 2, "invalid JSON"),
    ("prepare-bad-jsonl-line", ["prepare", "{d}/data/bad-line.jsonl", "-o", "{d}/out14"], {}, 2, "line 2"),
    ("prepare-empty-file", ["prepare", "{d}/data/empty.json", "-o", "{d}/out15"], {}, 2, "empty file"),
    (
        "prepare-unknown-format",
        ["prepare", "{d}/data/unknown-format.json", "-o", "{d}/out16"],
        {},
        2,
        "unknown-format.json",
    ),
    ("prepare-folder-without-name", ["prepare", "{d}/data", "-o", "{d}/out17"], {}, 2, "--dataset"),
    ("prepare-unknown-dataset", ["prepare", "{d}/data", "--dataset", "nope", "-o", "{d}/out18"], {}, 2, "nope"),
    ("prepare-seed-not-a-number", ["prepare", "{d}/data/good.json", "--seed", "abc"], {}, 2, "--seed"),
    # prepare: nesting past the JSON reader's limit, lone surrogates, names that would leave -o
    *[
        (f"prepare-{f}", ["prepare", f"{{d}}/data/{f}", "-o", "{d}/out-deep"], {}, 2, expected)
        for f, expected in (
            ("deep-1100.json", "nested deeper"),
            ("deep-100000.json", "nested deeper"),
            ("deep-record.json", "nested deeper"),
            ("deep-output.json", "record 5: field `output` must be a string"),
            ("deep-line.jsonl", "line 2: JSON nested deeper"),
            ("surrogate-instruction.json", "record 5: turn 0 (user) holds a lone UTF-16 surrogate"),
            ("surrogate-output.json", "record 5: turn 1 (assistant) holds a lone UTF-16 surrogate"),
            ("surrogate-extra.json", "record 5: x[0]: contains a lone UTF-16 surrogate"),
            ("surrogate-low.jsonl", "record 3"),
            ("surrogate-sharegpt.json", "record 9"),
        )
    ],
    (
        "prepare-deep-dataset-info",
        ["prepare", "{d}/deep-info", "--dataset", "x", "-o", "{d}/o"],
        {},
        2,
        "nested deeper",
    ),
    *[
        (f"prepare-name-{i}", ["prepare", "{d}/data/good.json", "-o", "{d}/out-name", "--name", name], {}, 2, "--name")
        for i, name in enumerate(("a/b", "../../escaped", "..", "/tmp/abs", "a\\b", "", ".hidden", "x" * 101, "a..b"))
    ],
    # serving commands: flags and adapters
    ("api-port-out-of-range", ["api", "--port", "70000"], {}, 2, "--port: expected a port number"),
    ("api-port-zero", ["api", "--port", "0"], {}, 2, "--port"),
    ("api-port-env", ["api"], {"API_PORT": "http"}, 2, "API_PORT"),
    ("api-adapter-flag", ["api", "--adapter", "just-a-path"], {}, 2, "--adapter: expected NAME=PATH"),
    ("api-batch-size-zero", ["api", "--max-batch-size", "0"], {}, 2, "--max-batch-size"),
    ("api-request-limit-zero", ["api", "--max-request-bytes", "0"], {}, 2, "--max-request-bytes"),
    ("api-missing-adapter", ["api", "model_name_or_path={model}", "--adapter", "a={d}/no-adapter"], {}, 2, "not found"),
    ("webchat-half-login", ["webchat", "--username", "ada"], {"WEBCHAT_PASSWORD": ""}, 2, "--username/--password"),
    ("webchat-port-out-of-range", ["webchat", "--port", "70000"], {}, 2, "--port"),
    (
        "chat-missing-adapter",
        ["chat", "model_name_or_path={model}", "adapter_name_or_path={d}/no-adapter"],
        {},
        2,
        "not found",
    ),
    ("chat-missing-model", ["chat", "model_name_or_path={d}/no-model"], {}, 2, "model_name_or_path"),
    # a truncated adapter weights file, in each command that loads adapters
    (
        "chat-cut-adapter",
        ["chat", "model_name_or_path={model}", "adapter_name_or_path={d}/cut-adapter"],
        {},
        2,
        "cannot load",
    ),
    ("api-cut-adapter", ["api", "model_name_or_path={model}", "--adapter", "a={d}/cut-adapter"], {}, 2, "cannot load"),
    (
        "webchat-cut-adapter",
        ["webchat", "model_name_or_path={model}", "--adapter", "a={d}/cut-adapter"],
        {},
        2,
        "cannot load",
    ),
    (
        "eval-cut-adapter",
        [
            "eval",
            "model_name_or_path={model}",
            "adapter_name_or_path={d}/cut-adapter",
            "test_dataset={d}/data/good.json",
            "output_dir={d}/../eval-cut",
        ],
        {},
        2,
        "cannot load",
    ),
    (
        "export-cut-adapter",
        [
            "export",
            "model_name_or_path={model}",
            "adapter_name_or_path={d}/cut-adapter",
            "export_dir={d}/../export-cut",
        ],
        {},
        2,
        "cannot merge",
    ),
    # sampling values the sampler cannot work with: refused before the model loads
    *[
        (f"chat-{key}-{value}", ["chat", "model_name_or_path={model}", "do_sample=true", f"{key}={value}"], {}, 2, key)
        for key, value in (("temperature", "1e-40"), ("temperature", "0.0001"), ("top_p", "1e-45"), ("top_p", "0.0005"))
    ],
    *[
        (
            f"{command}-temperature-tiny",
            [command, "model_name_or_path={model}", "do_sample=true", "temperature=1e-30"],
            {},
            2,
            "temperature",
        )
        for command in ("api", "webchat")
    ],
    # the other commands
    ("eval-missing-predictions", ["eval", "--predictions", "{d}/nope.jsonl"], {}, 2, "nope.jsonl"),
    ("eval-compare-base-without-adapter", ["eval", "--compare-base"], {}, 2, "--compare-base"),
    ("compare-missing-folders", ["compare", "{d}/no-a", "{d}/no-b"], {}, 2, "no-a"),
    ("report-missing-folder", ["report", "{d}/no-run"], {}, 2, "no-run"),
    ("sweep-missing-file", ["sweep", "{d}/no-sweep.yaml"], {}, 2, "no-sweep.yaml"),
    ("unknown-command", ["trian"], {}, 2, "No such command"),
    ("unknown-option", ["train", "--overwrit"], {}, 2, "No such option"),
]


@pytest.fixture(autouse=True)
def fresh_log_handler():
    """Each case gets loralab's stderr log handler on this case's captured stderr."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_loralab", False)]:
        root.removeHandler(handler)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_bad_input_corpus(case, inputs, tiny_model, monkeypatch, capsys):
    from loralab import cli

    _, args, env, status, expected = case
    args = [a.format(d=inputs, model=tiny_model) for a in args]
    for key in ("API_KEY", "API_HOST", "API_PORT", "WEBCHAT_PASSWORD"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(inputs)  # default paths (data/, runs/default) land in the corpus folder
    before = snapshot(inputs)
    monkeypatch.setattr(sys, "argv", ["loralab", *args])
    with pytest.raises(SystemExit) as exit_:  # any other exception would be a traceback for the user
        cli.main()
    out, err = capsys.readouterr()
    assert exit_.value.code == status, err[-2000:]
    assert "Traceback" not in out + err
    assert expected in err, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1
    assert snapshot(inputs) == before, "an input file was changed or a file was written"


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


def test_train_typo_fails_before_torch_is_imported(inputs):
    """The real command: a config typo is reported without importing torch (seconds saved)."""
    code = (
        "import sys; from loralab import cli; sys.argv = ['loralab', 'train', 'lora_rnk=8']\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    print('torch' in sys.modules, e.code)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=inputs,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
        check=False,
    )
    assert proc.stdout.split() == ["False", "2"], proc.stderr[-2000:]
    assert "did you mean `lora_rank`" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe\n", b"hello\n\xc3\x28 broken\n", b"\xed\xa0\x80\n"],
    ids=["bom-like", "after-a-line", "cesu-surrogate"],
)
def test_chat_refuses_stdin_that_is_not_utf8_in_one_line(data, tiny_model, tmp_path, monkeypatch, capsys):
    """Bytes that are not UTF-8 piped into `loralab chat`: one error line, exit 2 (a reply may come first)."""
    import io

    from loralab import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    monkeypatch.setattr(sys, "argv", ["loralab", "chat", f"model_name_or_path={tiny_model}", "max_new_tokens=2"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "Traceback" not in out + err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        next(line for line in err.splitlines() if line.startswith("error: stdin: not UTF-8 text"))
    ]
