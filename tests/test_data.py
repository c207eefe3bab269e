"""Data stage: formats, LLaMA-Factory folders, prepare (clean/sample/split/manifest), errors, loaders."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loralab import data, demo_data
from loralab.config import Config
from loralab.errors import LoralabError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1), encoding="utf-8")
    return path


def alpaca(n: int, start: int = 0) -> list[dict]:
    return [
        {"instruction": f"Say {i}.", "input": "" if i % 2 else f"x{i}", "output": f"{i}"}
        for i in range(start, start + n)
    ]


def sharegpt(n: int) -> list[dict]:
    return [
        {
            "conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": f"hello {i}"}],
            "system": "Be brief.",
        }
        for i in range(n)
    ]


def openai(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": f"q{i}"},
                {"role": "assistant", "content": f"a{i}"},
            ]
        }
        for i in range(n)
    ]


def hashes(path: Path) -> set[str]:
    return {data.content_hash(data.to_messages(r)) for r in json.loads(path.read_text())}


def run_cli(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loralab.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **env},
        timeout=120,
    )


# --- formats -------------------------------------------------------------------------------------
def test_to_messages_alpaca_with_system_and_history():
    rec = {"instruction": "Translate", "input": "chat", "output": "cat", "system": "S", "history": [["hi", "hello"]]}
    assert data.to_messages(rec) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Translate\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    # empty input: the instruction alone (no trailing newline), as LLaMA-Factory builds it
    assert data.to_messages({"instruction": "Hi", "input": "", "output": "Yo"})[0] == {"role": "user", "content": "Hi"}


def test_to_messages_sharegpt_and_openai():
    assert data.to_messages(sharegpt(1)[0]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi 0"},
        {"role": "assistant", "content": "hello 0"},
    ]
    # a system turn inside the conversation wins over the system column
    rec = {
        "conversations": [
            {"from": "system", "value": "inner"},
            {"from": "human", "value": "q"},
            {"from": "gpt", "value": "a"},
        ],
        "system": "outer",
    }
    assert [m["content"] for m in data.to_messages(rec)] == ["inner", "q", "a"]
    assert [m["role"] for m in data.to_messages(openai(1)[0])] == ["system", "user", "assistant"]


@pytest.mark.parametrize("make,fmt", [(alpaca, "alpaca"), (sharegpt, "sharegpt"), (openai, "openai")])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_each_format_reads(tmp_path, make, fmt, suffix):
    records = make(5)
    text = json.dumps(records) if suffix == ".json" else "\n".join(json.dumps(r) for r in records) + "\n"
    path = write(tmp_path / f"d{suffix}", text)
    got, name = data.load_records(str(path))
    assert got == records and name == fmt
    man = data.prepare(str(path), output_dir=tmp_path / "out", split="3,1,1")
    assert man["format"] == fmt
    # split files keep the input's record format, and LLaMA-Factory's entry describes it
    assert json.loads((tmp_path / "out" / "alpaca_data_val.json").read_text())[0] in records
    entry = json.loads((tmp_path / "out" / "dataset_info.json").read_text())["alpaca_data_train"]
    assert entry["file_name"] == "alpaca_data_train.json"
    if fmt == "openai":
        assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "messages"}
        assert entry["tags"]["role_tag"] == "role" and entry["tags"]["assistant_tag"] == "assistant"
    if fmt == "sharegpt":
        assert (
            entry["columns"] == {"messages": "conversations", "system": "system"}
            and entry["tags"]["user_tag"] == "human"
        )


def test_alpaca_system_and_history_are_registered_for_llamafactory(tmp_path):
    records = [
        {"instruction": f"q{i}", "input": "", "output": f"a{i}", "system": "S", "history": [["h", "k"]]}
        for i in range(5)
    ]
    data.prepare(str(write(tmp_path / "a.json", records)), output_dir=tmp_path / "o", split="3,1,1")
    entry = json.loads((tmp_path / "o" / "dataset_info.json").read_text())["alpaca_data_test"]
    assert entry["columns"] == {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "system": "system",
        "history": "history",
    }
    cfg = Config(test_dataset="alpaca_data_test", dataset_dir=str(tmp_path / "o"))
    assert [m["role"] for m in data.load_conversations(cfg, "test")[0]] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
    ]


def test_llamafactory_folder_with_custom_columns(tmp_path):
    folder = tmp_path / "lf"
    write(folder / "qa.json", [{"q": f"question {i}", "a": f"answer {i}", "sys": "S"} for i in range(10)])
    write(
        folder / "dataset_info.json",
        {
            "other": {"file_name": "missing.json"},
            "my_qa": {"file_name": "qa.json", "columns": {"prompt": "q", "response": "a", "system": "sys"}},
        },
    )
    records, fmt = data.load_records(str(folder), dataset="my_qa")
    assert len(records) == 10 and fmt == "alpaca"
    out = tmp_path / "out"
    data.prepare(str(folder), output_dir=out, dataset="my_qa", split="6,2,2", name="qa")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["qa_train"]["columns"]["prompt"] == "q"  # the mapping travels with the records
    # the other stages read the new splits back through dataset_info.json
    cfg = Config(dataset="qa_train", eval_dataset="qa_val", test_dataset="qa_test", dataset_dir=str(out))
    train = data.load_conversations(cfg, "train")
    assert len(train) == 6 and train[0][0] == {"role": "system", "content": "S"}
    assert train[0][1]["content"].startswith("question ") and train[0][2]["content"].startswith("answer ")
    # FOLDER:NAME is the same source
    assert data.load_source(f"{folder}:my_qa")[0] == records


# --- prepare -------------------------------------------------------------------------------------
def test_prepare_is_deterministic_and_splits_are_disjoint(tmp_path):
    src = write(tmp_path / "src.json", alpaca(60))
    runs = []
    for k in range(2):
        out = tmp_path / f"out{k}"
        data.prepare(str(src), output_dir=out, seed=7, sample=50, split="30,10,10")
        runs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert runs[0] == runs[1] and len(runs[0]) == 5  # 3 splits, manifest, dataset_info.json
    splits = [hashes(tmp_path / "out0" / f"alpaca_data_{s}.json") for s in data.SPLITS]
    assert [len(s) for s in splits] == [30, 10, 10]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # another seed draws another sample
    data.prepare(str(src), output_dir=tmp_path / "seed8", seed=8, sample=50, split="30,10,10")
    assert (tmp_path / "seed8" / "alpaca_data_train.json").read_bytes() != runs[0]["alpaca_data_train.json"]
    raw = runs[0]["alpaca_data_train.json"]
    assert raw.endswith(b"]\n") and raw.startswith(b'[\n  {\n    "instruction"')  # indent=2, trailing newline


def test_cleaning_counts_and_manifest(tmp_path):
    records = alpaca(20) + [
        alpaca(1, 3)[0],  # exact copy of record 3
        {"instruction": "blank", "input": "", "output": "  "},  # empty output
        {"instruction": "dup", "input": "", "output": "3"},
        {"instruction": "dup", "output": "3"},  # same content as the record before (no input = "")
    ]
    src = write(tmp_path / "src.json", records)
    man = data.prepare(str(src), output_dir=tmp_path / "out", split="0.5,0.25,0.25")
    assert man["dropped"] == {"empty_output": 1, "duplicate": 2, "too_long": 0}
    assert man["counts"]["actual"] == man["counts"]["requested"] == {"train": 11, "val": 5, "test": 5}
    assert man["source"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    for s in data.SPLITS:
        f = tmp_path / "out" / man["files"][s]["file_name"]
        assert man["files"][s]["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert man["seed"] == 42 and man["format"] == "alpaca" and man["loralab_version"]


def test_multiturn_empty_last_answer_is_dropped(tmp_path):
    records = sharegpt(6)
    records[2]["conversations"][-1]["value"] = ""
    records[3]["conversations"] = records[3]["conversations"][:1]  # no assistant reply at all
    man = data.prepare(str(write(tmp_path / "s.json", records)), output_dir=tmp_path / "o", split="2,1,1")
    assert man["dropped"]["empty_output"] == 2


@pytest.mark.parametrize(
    "split,sample,expected",
    [
        ("0.7,0.2,0.1", None, [28, 8, 4]),
        ("0.7,0.2,0.1", 20, [14, 4, 2]),
        ("0.5,0.1,0.1", 10, [5, 1, 1]),
        ("12,5,3", None, [12, 5, 3]),
        ("12,5,3", 20, [12, 5, 3]),
    ],
)
def test_split_counts_and_fractions(tmp_path, split, sample, expected):
    src = write(tmp_path / "src.json", alpaca(40))
    man = data.prepare(str(src), output_dir=tmp_path / "o", split=split, sample=sample)
    assert list(man["counts"]["actual"].values()) == expected
    assert [len(json.loads((tmp_path / "o" / f"alpaca_data_{s}.json").read_text())) for s in data.SPLITS] == expected


def test_dataset_info_merge_keeps_other_entries(tmp_path):
    out = tmp_path / "out"
    write(out / "dataset_info.json", {"mine": {"file_name": "mine.json", "formatting": "sharegpt"}})
    data.prepare("builtin:demo", output_dir=out, sample=20, split="10,5,5", name="demo")
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["mine"] == {"file_name": "mine.json", "formatting": "sharegpt"}
    assert {"demo_train", "demo_val", "demo_test"} <= set(info)


def test_overwrite_protection(tmp_path):
    src = write(tmp_path / "src.json", alpaca(10))
    data.prepare(str(src), output_dir=tmp_path / "o", split="6,2,2")
    before = (tmp_path / "o" / "alpaca_data_train.json").read_bytes()
    with pytest.raises(LoralabError, match=r"alpaca_data_train\.json: already exists; pass --overwrite"):
        data.prepare(str(src), output_dir=tmp_path / "o", split="6,2,2", seed=1)
    assert (tmp_path / "o" / "alpaca_data_train.json").read_bytes() == before
    data.prepare(str(src), output_dir=tmp_path / "o", split="6,2,2", seed=1, overwrite=True)
    assert (tmp_path / "o" / "alpaca_data_train.json").read_bytes() != before


def test_max_tokens_drops_long_records(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "Say", "x", "long", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    records = alpaca(10) + [{"instruction": "long " * 50, "input": "", "output": "ok"}]
    src = write(tmp_path / "src.json", records)
    man = data.prepare(
        str(src), output_dir=tmp_path / "o", split="6,2,2", max_tokens=20, tokenizer=str(tmp_path / "tok")
    )
    assert man["dropped"]["too_long"] == 1 and man["max_tokens"] == 20
    with pytest.raises(LoralabError, match="--tokenizer"):
        data.prepare(
            str(src), output_dir=tmp_path / "o2", split="6,2,2", max_tokens=20, tokenizer=str(tmp_path / "nope")
        )
    with pytest.raises(LoralabError, match="needs --tokenizer"):
        data.prepare(str(src), output_dir=tmp_path / "o3", split="6,2,2", max_tokens=20)


# --- demo data -----------------------------------------------------------------------------------
def test_demo_data_is_deterministic_distinct_and_correct(tmp_path):
    records = demo_data.make_demo_records()
    assert len(records) == 1000 and records == demo_data.make_demo_records()
    assert len({(r["instruction"], r["input"]) for r in records}) == 1000
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    for r in records:
        assert set(r) == {"instruction", "input", "output"} and 0 < len(r["output"].split()) <= 20
        if r["output"].startswith("The sum of"):
            a, b, total = (int(w.strip(".")) for w in r["output"].split() if w.strip(".").isdigit())
            assert a + b == total
        if r["instruction"] == "Sort these words alphabetically.":
            assert r["output"].split(", ") == sorted(r["input"].split(", "))
    man = data.prepare("builtin:demo", output_dir=tmp_path, split="0.8,0.1,0.1")
    assert man["source"]["sha256"] == hashlib.sha256(demo_data.demo_json_bytes()).hexdigest()
    assert man["counts"]["actual"] == {"train": 800, "val": 100, "test": 100}


# --- errors --------------------------------------------------------------------------------------
BAD_INPUTS = {
    "invalid_json": (
        '[{"instruction": "a", "output": "b"},\n  {"instruction": }]',
        r"invalid JSON at line 2, column \d+",
    ),
    "invalid_jsonl": ('{"instruction": "a", "output": "b"}\n{oops}\n', r"invalid JSON at line 2, column \d+"),
    "missing_field": ([{"instruction": "a", "output": "b"}, {"instruction": "c"}], r"record 1: missing field `output`"),
    "non_string": (
        [{"instruction": "a", "output": "b"}] * 2 + [{"instruction": "c", "output": 3}],
        r"record 2: field `output` must be a string, got int",
    ),
    "bad_role": (
        [{"conversations": [{"from": "robot", "value": "x"}]}],
        r"record 0: `conversations\[0\].from` is 'robot'",
    ),
    "empty_file": ("  \n", r"empty file"),
    "empty_list": ("[]", r"no records"),
    "unknown_format": ([{"text": "hello"}], r"unknown record format .*keys text"),
    "not_a_list": ('{"instruction": "a"}', r"expected a JSON list of records"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error(tmp_path, case):
    content, pattern = BAD_INPUTS[case]
    src = write(tmp_path / ("src.jsonl" if case == "invalid_jsonl" else "src.json"), content)
    with pytest.raises(LoralabError, match=pattern) as err:
        data.prepare(str(src), output_dir=tmp_path / "o")
    assert "\n" not in str(err.value) and str(src) in str(err.value)
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_other_errors(tmp_path):
    src = write(tmp_path / "src.json", alpaca(10))
    with pytest.raises(LoralabError, match="asked for 100 records but only 10 usable"):
        data.prepare(str(src), output_dir=tmp_path / "o", sample=100)
    with pytest.raises(LoralabError, match="asked for 30 records but only 10"):
        data.prepare(str(src), output_dir=tmp_path / "o", split="10,10,10")
    with pytest.raises(LoralabError, match="nope.json: file not found"):
        data.prepare(str(tmp_path / "nope.json"), output_dir=tmp_path / "o")
    with pytest.raises(LoralabError, match="--split"):
        data.prepare(str(src), output_dir=tmp_path / "o", split="1,2")
    write(tmp_path / "lf" / "dataset_info.json", {"known": {"file_name": "k.json"}})
    with pytest.raises(LoralabError, match=r"dataset_info.json: unknown dataset `other` \(known: known\)"):
        data.prepare(str(tmp_path / "lf"), dataset="other", output_dir=tmp_path / "o")
    with pytest.raises(LoralabError, match="pass --dataset NAME"):
        data.prepare(str(tmp_path / "lf"), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    write(tmp_path / "o" / "dataset_info.json", "{not json")
    with pytest.raises(LoralabError, match=r"o/dataset_info.json: invalid JSON at line 1, column 2"):
        data.prepare(str(src), output_dir=tmp_path / "o", split="6,2,2")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["dataset_info.json"]  # nothing written


def test_cli_errors_are_one_line_exit_2(tmp_path):
    # the real command: every kind of bad input exits 2 with one line on stderr, no traceback
    write(tmp_path / "bad.json", '[{"instruction": "a", "output": "b"},\n  {"instruction": }]')
    write(tmp_path / "missing.json", [{"instruction": "c"}])
    write(tmp_path / "empty.json", "")
    write(tmp_path / "ok.json", alpaca(5))
    write(tmp_path / "lf" / "dataset_info.json", {"known": {"file_name": "k.json"}})
    cases = [
        ([str(tmp_path / "bad.json")], "invalid JSON at line 2"),
        ([str(tmp_path / "missing.json")], "record 0: missing field `output`"),
        ([str(tmp_path / "empty.json")], "empty file"),
        ([str(tmp_path / "nope.json")], "file not found"),
        ([str(tmp_path / "ok.json"), "--sample", "50"], "asked for 50 records"),
        ([str(tmp_path / "lf"), "--dataset", "zzz"], "unknown dataset `zzz`"),
    ]
    for args, expected in cases:
        proc = run_cli("prepare", *args, "-o", str(tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.splitlines()  # INFO log lines may come first; the error is the one last line
        assert lines[-1].startswith("error: ") and expected in lines[-1], proc.stderr
        assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in proc.stderr
    ok = run_cli("prepare", str(tmp_path / "ok.json"), "--split", "3,1,1", "-o", str(tmp_path / "out"))
    assert ok.returncode == 0 and "train 3, val 1, test 1" in ok.stdout
    again = run_cli("prepare", str(tmp_path / "ok.json"), "--split", "3,1,1", "-o", str(tmp_path / "out"))
    assert again.returncode == 2 and "alpaca_data_train.json: already exists; pass --overwrite" in again.stderr


def test_hub_id_offline_says_how_to_use_a_local_file(tmp_path):
    proc = run_cli("prepare", "yahma/alpaca-cleaned", "-o", str(tmp_path / "out"), HF_DATASETS_OFFLINE="1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: yahma/alpaca-cleaned: could not load") and "pass a local file" in line


# --- loaders for the other stages ----------------------------------------------------------------
def test_load_conversations_names_files_max_samples_and_val_size(tmp_path):
    data.prepare("builtin:demo", output_dir=tmp_path, sample=100, split="60,20,20", name="demo")
    cfg = Config(dataset="demo_train", eval_dataset="demo_val", test_dataset="demo_test", dataset_dir=str(tmp_path))
    assert [len(data.load_conversations(cfg, w)) for w in ("train", "eval", "test")] == [60, 20, 20]
    # two datasets, one as a name and one as a path, each capped by max_samples
    cfg2 = cfg.model_copy(update={"dataset": f"demo_train,{tmp_path / 'demo_val.json'}", "max_samples": 15})
    assert len(data.load_conversations(cfg2, "train")) == 30
    # no eval_dataset + val_size: a seeded hold-out of train, disjoint from what train returns
    cfg3 = cfg.model_copy(update={"eval_dataset": None, "val_size": 0.25})
    train, val = data.load_conversations(cfg3, "train"), data.load_conversations(cfg3, "eval")
    assert len(train) == 45 and len(val) == 15 and val == data.load_conversations(cfg3, "eval")
    assert not {data.content_hash(c) for c in train} & {data.content_hash(c) for c in val}
    assert data.load_conversations(cfg.model_copy(update={"eval_dataset": None}), "eval") == []
    # LLaMA-Factory's val_size may also be a number of records
    cfg4 = Config(**{**cfg.model_dump(), "eval_dataset": None, "val_size": 7})
    assert [len(data.load_conversations(cfg4, w)) for w in ("train", "eval")] == [53, 7]
    with pytest.raises(ValueError, match="whole number"):
        Config(val_size=2.5)
    with pytest.raises(LoralabError, match=r"dataset `nope`: not in .*dataset_info.json.*loralab prepare"):
        data.load_conversations(cfg.model_copy(update={"test_dataset": "nope"}), "test")


def test_eval_and_test_max_samples_cap_only_their_split(tmp_path):
    """eval_max_samples / test_max_samples keep the first N records of validation / test, never touch train,
    and a capped hold-out (val_size) still never moves a record into training."""
    data.prepare("builtin:demo", output_dir=tmp_path, sample=100, split="60,20,20", name="demo")
    cfg = Config(dataset="demo_train", eval_dataset="demo_val", test_dataset="demo_test", dataset_dir=str(tmp_path))
    capped = cfg.model_copy(update={"eval_max_samples": 7, "test_max_samples": 5})
    assert [len(data.load_conversations(capped, w)) for w in ("train", "eval", "test")] == [60, 7, 5]
    assert data.load_conversations(capped, "eval") == data.load_conversations(cfg, "eval")[:7]  # the first N
    assert data.load_conversations(capped, "test") == data.load_conversations(cfg, "test")[:5]
    assert data.subset_cap(capped, "test") == ("test_max_samples", 5) and data.subset_cap(cfg, "eval") is None
    big = cfg.model_copy(update={"test_max_samples": 1000})  # a cap above the split's size changes nothing
    assert len(data.load_conversations(big, "test")) == 20
    held = cfg.model_copy(update={"eval_dataset": None, "val_size": 0.25, "eval_max_samples": 4})
    train, val = data.load_conversations(held, "train"), data.load_conversations(held, "eval")
    assert len(train) == 45 and len(val) == 4
    assert val == data.load_conversations(held.model_copy(update={"eval_max_samples": None}), "eval")[:4]


# --- the real data -------------------------------------------------------------------------------
def test_reference_split_of_real_alpaca(tmp_path, alpaca_file):
    t0 = time.time()
    mans = [
        data.prepare(str(alpaca_file), output_dir=tmp_path / f"run{k}", seed=42, sample=10000, split="7000,2000,1000")
        for k in range(2)
    ]
    assert mans[0]["counts"]["actual"] == {"train": 7000, "val": 2000, "test": 1000}
    assert mans[0]["source"]["records"] == 50921 and mans[0]["format"] == "alpaca"
    assert mans[0]["source"]["sha256"] == hashlib.sha256(alpaca_file.read_bytes()).hexdigest()
    splits = [hashes(tmp_path / "run0" / f"alpaca_data_{s}.json") for s in data.SPLITS]
    assert [len(s) for s in splits] == [7000, 2000, 1000] and len(set().union(*splits)) == 10000
    for name in [
        "alpaca_data_train.json",
        "alpaca_data_val.json",
        "alpaca_data_test.json",
        "alpaca_data_manifest.json",
        "dataset_info.json",
    ]:
        assert (tmp_path / "run0" / name).read_bytes() == (tmp_path / "run1" / name).read_bytes()
    assert time.time() - t0 < 20
