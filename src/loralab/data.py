"""Datasets: read instruction data, prepare train/val/test splits, hand conversations to the stages.

Records stay in their own format on disk (alpaca, ShareGPT or OpenAI messages), so LLaMA-Factory
reads our split files as they are. A *format spec* is a LLaMA-Factory dataset_info.json entry
without its file_name: {"formatting", "columns", "tags"}; it says which keys hold the prompt, the
response, the message list and the roles. Every stage that needs text calls `to_messages(record)`
and gets `[{"role": "system"|"user"|"assistant", "content": str}, ...]`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from pathlib import Path
from typing import Any

from loralab import __version__
from loralab.config import Config, parse_split
from loralab.errors import LoralabError
from loralab.templates import check_json_value

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEMO_SOURCE = "builtin:demo"

# LLaMA-Factory's defaults for the columns and tags of a dataset_info.json entry.
COLUMN_DEFAULTS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "history": None,
    "system": None,
    "messages": "conversations",
}
SHAREGPT_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "gpt",
    "system_tag": "system",
    "observation_tag": "observation",
    "function_tag": "function_call",
}
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
    "observation_tag": "tool",
    "function_tag": "function_call",
}
# File types LLaMA-Factory reads (by extension) and the `datasets` builder that reads each; JSON has our own reader.
FILE_TYPES = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
}

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
FORMATS_HELP = (
    "expected alpaca (instruction/input/output), ShareGPT (conversations with from/value) "
    "or OpenAI messages (messages with role/content)"
)


# --- reading -------------------------------------------------------------------------------------
def dump_json(obj: Any) -> bytes:
    """The one way we write JSON: indent=2, UTF-8 as is, trailing newline (byte-stable)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def sha256_bytes(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


TOO_DEEP = "JSON nested deeper than the JSON reader follows (about 1,000 levels); records are flat objects"


def read_json_records(path: Path) -> list:
    """A JSON list of records, or JSON lines (.jsonl, or a .json file holding one object per line)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LoralabError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise LoralabError(f"{path}: empty file; expected a JSON list of records or JSON lines")
    if path.suffix == ".jsonl":
        records = _json_lines(text, path)
    else:
        try:
            records = json.loads(text)
        except RecursionError:
            raise LoralabError(f"{path}: {TOO_DEEP}") from None
        except json.JSONDecodeError as e:
            if e.msg != "Extra data" or not text.lstrip().startswith("{"):
                raise LoralabError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
            records = _json_lines(text, path)  # several values one after another: JSON lines
    if not isinstance(records, list):
        raise LoralabError(f"{path}: expected a JSON list of records at the top level, got {type(records).__name__}")
    if not records:
        raise LoralabError(f"{path}: no records (the list is empty)")
    return records


def _json_lines(text: str, path: Path) -> list:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except RecursionError:
                raise LoralabError(f"{path}: line {n}: {TOO_DEEP}") from None
            except json.JSONDecodeError as e:
                raise LoralabError(f"{path}: invalid JSON at line {n}, column {e.colno}: {e.msg}") from None
    return records


def read_records(path: Path) -> list:
    """Records of one data file: JSON/JSONL (our reader), or csv/parquet/arrow/txt through `datasets`."""
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise LoralabError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(FILE_TYPES)}")
    if kind == "json":
        return read_json_records(path)
    import datasets

    try:
        records = datasets.load_dataset(kind, data_files=str(path), split="train").to_list()
    except Exception as e:  # a damaged or empty file: one line for the user
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise LoralabError(f"{path}: cannot read it as {kind} ({type(e).__name__}: {why})") from None
    if not records:
        raise LoralabError(f"{path}: no records")
    return records


def folder_files(folder: Path) -> list[Path]:
    """The data files of a folder (file_name pointing at a folder), in file-name order."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FILE_TYPES), key=lambda p: p.name)


def read_dataset_info(folder: Path) -> dict:
    """FOLDER/dataset_info.json as a dict ({} when the file does not exist)."""
    path = folder / "dataset_info.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8-sig") or "{}")
    except RecursionError:
        raise LoralabError(f"{path}: {TOO_DEEP}") from None
    except json.JSONDecodeError as e:
        raise LoralabError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(info, dict):
        raise LoralabError(f"{path}: expected a JSON object mapping dataset names to entries")
    return info


def load_hub(repo: str, subset: str | None = None, split: str = "train") -> list[dict]:
    """A Hugging Face hub dataset as a list of records (needs the network or the datasets cache)."""
    try:
        import datasets

        ds = datasets.load_dataset(repo, subset, split=split)
    except Exception as e:  # offline, unknown repo, bad split: all end as one line for the user
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise LoralabError(
            f"{repo}: could not load this dataset from the Hugging Face hub ({type(e).__name__}: {why}); "
            "offline? download the data and pass a local file instead, "
            "e.g. `loralab prepare path/to/alpaca_data_cleaned.json`"
        ) from None
    if len(ds) == 0:
        raise LoralabError(f"{repo}: the hub dataset has no records")
    return ds.to_list()


def detect_spec(records: list, where: str) -> dict:
    """Guess the format spec from the first record (and which optional keys any record has)."""
    first = records[0]
    if not isinstance(first, dict):
        raise LoralabError(f"{where}: record 0: expected a JSON object, got {type(first).__name__}")
    keys = set().union(*(r for r in records if isinstance(r, dict)))
    for col in ("conversations", "messages"):
        if col in first:
            turns = first[col]
            openai = bool(turns) and isinstance(turns, list) and isinstance(turns[0], dict) and "role" in turns[0]
            spec = {
                "formatting": "sharegpt",
                "columns": {"messages": col},
                "tags": dict(OPENAI_TAGS if openai else SHAREGPT_TAGS),
            }
            if "system" in keys:
                spec["columns"]["system"] = "system"
            return spec
    if "instruction" in first or "output" in first:
        spec: dict[str, Any] = {"formatting": "alpaca"}
        extra = [k for k in ("system", "history") if k in keys]
        if extra:  # LLaMA-Factory only reads system/history when the entry names them
            spec["columns"] = {"prompt": "instruction", "query": "input", "response": "output", **{k: k for k in extra}}
        return spec
    raise LoralabError(
        f"{where}: unknown record format (record 0 has keys {', '.join(sorted(first)) or 'none'}); {FORMATS_HELP}"
    )


def format_name(spec: dict) -> str:
    """'alpaca', 'sharegpt' or 'openai' (a sharegpt spec with role/content tags)."""
    if spec.get("formatting", "alpaca") in ("alpaca", "openai"):
        return spec.get("formatting", "alpaca")
    return "openai" if (spec.get("tags") or {}).get("role_tag") == "role" else "sharegpt"


def _resolve(spec: dict | None, record: Any) -> dict:
    """Spec -> flat {column/tag: key name} with LLaMA-Factory's defaults filled in."""
    if spec is None:
        spec = detect_spec([record], "record")
    formatting = spec.get("formatting", "alpaca")
    tags = OPENAI_TAGS if formatting == "openai" else SHAREGPT_TAGS  # role/content records need no tags entry
    return {
        "formatting": formatting,
        **COLUMN_DEFAULTS,
        "tools": None,
        **tags,
        **(spec.get("columns") or {}),
        **(spec.get("tags") or {}),
    }


# --- records -> messages ------------------------------------------------------------------------
def _text(obj: dict, key: str | None, required: bool = False, prefix: str = "") -> str:
    """obj[key] as a string; absent/null optional fields are ''. Problems raise ValueError."""
    if key is None or obj.get(key) is None:
        if required:
            raise ValueError(
                f"missing field `{prefix}{key}`"
                if key not in obj
                else f"field `{prefix}{key}` is null, expected a string"
            )
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field `{prefix}{key}` must be a string, got {type(value).__name__}")
    return value


# Several tool results in a row are one observation turn, joined as LLaMA-Factory's openai converter joins them.
TOOL_RESULTS_JOIN = "\n</tool_response>\n<tool_response>\n"


def _convert(record: Any, f: dict) -> list[dict]:
    """One record -> messages, following LLaMA-Factory's alpaca/sharegpt/openai converters.

    A record LLaMA-Factory would skip (no answer, roles out of order) raises ValueError saying why.
    Roles: system, user, assistant, and LLaMA-Factory's tool turns `function` (the assistant's tool call,
    learned) and `observation` (the tool's result, prompt).
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    system = _text(record, f["system"])
    tools = _tools(record, f["tools"])
    if f["formatting"] == "alpaca":
        msgs = _system_message(system, tools)
        query = [t for t in (_text(record, f["prompt"]), _text(record, f["query"])) if t]
        response = _text(record, f["response"], required=True)  # null/missing: no answer to learn
        history = record.get(f["history"]) if f["history"] else None
        if isinstance(history, list):  # LLaMA-Factory reads history only when it is a list
            pairs_ok = all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in history
            )
            if not pairs_ok:
                raise ValueError(f"field `{f['history']}` must be a list of [user, assistant] string pairs")
            for user, assistant in history:
                msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        # LLaMA-Factory's prompt: instruction, then the input on a new line when there is one.
        msgs.append({"role": "user", "content": "\n".join(query)})
        msgs.append({"role": "assistant", "content": response})
        return msgs
    if f["formatting"] not in ("sharegpt", "openai"):
        raise ValueError(f"unknown formatting {f['formatting']!r}; expected alpaca, sharegpt or openai")
    col, rt, ct = f["messages"], f["role_tag"], f["content_tag"]
    turns = record.get(col)
    if not isinstance(turns, list):
        raise ValueError(f"missing field `{col}`" if col not in record else f"field `{col}` must be a list of messages")
    roles = {
        f["user_tag"]: "user",
        f["assistant_tag"]: "assistant",
        f["observation_tag"]: "observation",
        f["function_tag"]: "function",
        f["system_tag"]: "system",
    }
    msgs: list[dict] = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ValueError(f"`{col}[{j}]` must be an object with `{rt}` and `{ct}`")
        tag = _text(turn, rt, required=True, prefix=f"{col}[{j}].")
        if tag not in roles:
            raise ValueError(f"`{col}[{j}].{rt}` is {tag!r}; expected one of {', '.join(r for r in roles if r)}")
        role = roles[tag]
        if f["formatting"] == "openai" and role in ("assistant", "function") and turn.get("tool_calls"):
            # OpenAI tool calls: the calls' `function` objects as the function turn's JSON (as LLaMA-Factory does)
            content = json.dumps([call["function"] for call in turn["tool_calls"]], ensure_ascii=False)
            role = "function"
        else:
            content = _text(turn, ct, required=True, prefix=f"{col}[{j}].")
        if f["formatting"] == "openai" and role == "observation" and msgs and msgs[-1]["role"] == "observation":
            # several tool results in a row are one observation turn (LLaMA-Factory joins them)
            msgs[-1]["content"] += TOOL_RESULTS_JOIN + content
            continue
        msgs.append({"role": role, "content": content})
    if msgs and msgs[0]["role"] == "system":
        system = msgs.pop(0)["content"]  # a system message in the conversation overrides the system column
    if f["formatting"] == "openai":
        system = openai_system(system, bool(f["tools"] and record.get(f["tools"])))
    return _system_message(system, tools) + msgs


def _system_message(system: str, tools: list[dict] | None) -> list[dict]:
    """The conversation's opening system message, if any; tool descriptions ride on it (templates.render
    writes them after the system text in the template's tool format)."""
    if tools:
        return [{"role": "system", "content": system, "tools": tools}]
    return [{"role": "system", "content": system}] if system else []


def _tools(record: dict, key: str | None) -> list[dict] | None:
    """The record's tool definitions (a JSON string or a list), or None without any; ValueError when unusable."""
    value = record.get(key) if key else None
    if not value:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except RecursionError:
            raise ValueError(f"field `{key}` is JSON nested too deep") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"field `{key}` is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, list):
        raise ValueError(f"field `{key}` must be a list of tool definitions, got {type(value).__name__}")
    for j, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        parameters = function.get("parameters") or {} if isinstance(function, dict) else None
        properties = parameters.get("properties") or {} if isinstance(parameters, dict) else None
        if (
            not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not isinstance(properties, dict)
            or not all(isinstance(p, dict) for p in properties.values())
        ):
            raise ValueError(
                f'`{key}[{j}]` must be a tool definition {{"name", "description", "parameters"}} '
                'or {"type": "function", "function": {...}}'
            )
    return value or None


# LLaMA-Factory 0.9.5's `formatting: openai` converter writes Nemotron's reasoning switch into the system prompt
# of every record without tools (and a newline after a system prompt with tools). Reproduced, so the same
# entry trains on the same tokens; auto-detected role/content records (formatting sharegpt) do not get it.
THINKING_OFF = "detailed thinking off"


def openai_system(system: str, has_tools: bool) -> str:
    if has_tools:
        return system + "\n" if system else system
    if "detailed thinking on" in system or THINKING_OFF in system:
        return system
    return f"{system}\n{THINKING_OFF}" if system else THINKING_OFF


def turn_order_problem(msgs: list[dict]) -> str | None:
    """Why LLaMA-Factory would skip this conversation (turn order), or None.

    After an optional system message, turns alternate user/observation then assistant/function, starting
    with the user and ending with an answer.
    """
    turns = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    for j, m in enumerate(turns):
        expected = ("user", "observation") if j % 2 == 0 else ("assistant", "function")
        if m["role"] not in expected:
            return f"turn {j} is {m['role']}, expected {' or '.join(expected)}"
    if not turns or len(turns) % 2:
        return "expected an even number of turns ending with an answer"
    return None


def to_messages(record: dict, spec: dict | None = None) -> list[dict]:
    """Any supported record -> [{"role", "content"}, ...]. spec=None guesses the format from the keys."""
    try:
        return _convert(record, _resolve(spec, record))
    except ValueError as e:
        raise LoralabError(f"record: {e}") from None


def text_problem(msgs: list[dict]) -> str | None:
    """What makes a conversation's text unusable (a lone UTF-16 surrogate: JSON can carry one, no tokenizer
    or UTF-8 file can take it; tool definitions nested deeper than templates.MAX_JSON_DEPTH), else None."""
    for j, m in enumerate(msgs):
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            return f"turn {j} ({m['role']}) holds a lone UTF-16 surrogate at character {e.start}; send valid Unicode"
        if m.get("tools"):
            try:
                check_json_value(m["tools"], "tools")
            except LoralabError as e:
                return str(e)
    return None


def record_problem(record) -> str | None:
    """A lone surrogate anywhere in the record (its other fields are written into the split files too)."""
    try:
        check_json_value(record, "field", max_depth=10_000)
    except LoralabError as e:
        return str(e).removeprefix("field.")
    return None


def to_conversations(records: list, spec: dict, where: str, skip_bad: bool = False) -> list[list[dict]]:
    """Validate and convert every record.

    The first bad record is an error naming its index; with skip_bad (training and evaluation data, as in
    LLaMA-Factory) bad records are left out and one warning counts them and names their indices and why.
    """
    f = _resolve(spec, None)
    out, skipped = [], []
    for i, record in enumerate(records):
        try:
            msgs = _convert(record, f)
            problem = (turn_order_problem(msgs) if skip_bad else None) or text_problem(msgs) or record_problem(record)
            if problem:
                raise ValueError(problem)
            out.append(msgs)
        except ValueError as e:
            if not skip_bad:
                raise LoralabError(f"{where}: record {i}: {e}") from None
            skipped.append(f"record {i} ({e})")
    if skipped:
        if not out:
            raise LoralabError(f"{where}: every record is unusable, e.g. {skipped[0]}")
        shown = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        log.warning("%s: skipped %d of %d records: %s", where, len(skipped), len(records), shown)
    return out


def content_hash(obj: Any) -> str:
    """sha256 of canonical JSON: the identity of a record's messages, whatever its on-disk format."""
    return sha256_bytes(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8"))


# --- sources -------------------------------------------------------------------------------------
def _load_entry(folder: Path, name: str) -> tuple[list, dict, str]:
    """A dataset named in FOLDER/dataset_info.json -> (records, spec, sha256)."""
    info_path = folder / "dataset_info.json"
    info = read_dataset_info(folder)
    if name not in info:
        known = f"known: {', '.join(info)}" if info else "the file is missing or empty"
        raise LoralabError(
            f"{info_path}: unknown dataset `{name}` ({known}); create splits with `loralab prepare SOURCE -o {folder}`"
        )
    entry, where = info[name], f"{info_path}: `{name}`"
    if not isinstance(entry, dict) or entry.get("formatting", "alpaca") not in ("alpaca", "sharegpt", "openai"):
        raise LoralabError(f"{where}: expected an entry with file_name and formatting alpaca, sharegpt or openai")
    if entry.get("ranking"):
        raise LoralabError(
            f"{where}: preference (ranking) datasets are not supported; loralab does supervised fine-tuning"
        )
    spec = {k: entry[k] for k in ("formatting", "columns", "tags") if k in entry}
    if spec.get("formatting") == "openai":
        log.info(
            "%s: formatting openai adds %r to system prompts without tools, as LLaMA-Factory 0.9.5 does "
            "(formatting sharegpt with role/content tags reads the same records without it)",
            where,
            THINKING_OFF,
        )
    if entry.get("hf_hub_url"):
        records = load_hub(entry["hf_hub_url"], entry.get("subset"), entry.get("split", "train"))
        return records, spec, content_hash(records)
    if not entry.get("file_name"):
        raise LoralabError(f"{where}: needs `file_name` (a file or folder in {folder}) or `hf_hub_url`")
    target = folder / entry["file_name"]
    if not target.exists():
        raise LoralabError(f"{where}: file_name {target} not found")
    files = folder_files(target) if target.is_dir() else [target]
    digest = hashlib.sha256()
    records = []
    for path in files:
        digest.update(path.read_bytes())
        records += read_records(path)
    if not records:
        raise LoralabError(f"{where}: no records in {target}")
    return records, spec, digest.hexdigest()


def load_source(source: str, dataset: str | None = None) -> tuple[list, dict, str]:
    """File, LLaMA-Factory folder (+ dataset name, or FOLDER:NAME), hub id or builtin:demo
    -> (records, spec, sha256)."""
    if source == DEMO_SOURCE:
        from loralab import demo_data

        blob = demo_data.demo_json_bytes()
        records = json.loads(blob)
        return records, detect_spec(records, source), sha256_bytes(blob)
    path = Path(source)
    if dataset is None and ":" in source and not path.exists():
        folder, _, name = source.rpartition(":")
        if Path(folder).is_dir():
            path, dataset = Path(folder), name
    if path.is_dir():
        if not dataset:
            names = ", ".join(read_dataset_info(path)) or "none: dataset_info.json is missing"
            raise LoralabError(
                f"{path}: is a folder; pass --dataset NAME for a dataset in its dataset_info.json (known: {names})"
            )
        return _load_entry(path, dataset)
    if dataset:
        raise LoralabError(
            f"--dataset {dataset}: only applies when the source is a LLaMA-Factory data folder, not {source}"
        )
    if path.is_file():
        records = read_records(path)
        return records, detect_spec(records, source), sha256_bytes(path.read_bytes())
    if HUB_ID.fullmatch(source) and path.suffix not in (".json", ".jsonl"):
        records = load_hub(source)
        return records, detect_spec(records, source), content_hash(records)
    raise LoralabError(
        f"{source}: file not found; expected a JSON/JSONL file, a LLaMA-Factory data folder, "
        f"a hub dataset id like yahma/alpaca-cleaned, or {DEMO_SOURCE}"
    )


def load_records(path_or_source: str, dataset: str | None = None) -> tuple[list, str]:
    """Read and validate a source -> (records in their own format, 'alpaca'|'sharegpt'|'openai')."""
    records, spec, _ = load_source(str(path_or_source), dataset)
    to_conversations(records, spec, str(path_or_source))
    return records, format_name(spec)


# --- prepare: clean, sample, split, manifest -----------------------------------------------------
def count_tokens(tokenizer: str, conversations: list[list[dict]]) -> list[int]:
    """Tokens of each conversation's full text (all turns joined by newlines, tool definitions as JSON)."""
    from transformers import AutoTokenizer

    path, gguf = tokenizer, None
    if tokenizer.startswith("builtin:") or tokenizer.endswith(".gguf"):
        from loralab.models import resolve_model_path

        path, gguf = resolve_model_path(tokenizer)
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    except Exception as e:
        why = (str(e).strip().splitlines() or [""])[0][:200]
        raise LoralabError(
            f"--tokenizer {tokenizer}: cannot load a tokenizer from it ({type(e).__name__}: {why})"
        ) from None
    # tool definitions count too: they are written into the system prompt
    texts = [
        "\n".join(m["content"] + (json.dumps(m["tools"], ensure_ascii=False) if m.get("tools") else "") for m in msgs)
        for msgs in conversations
    ]
    return [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def split_sizes(split: str, sample: int | None, available: int, where: str) -> list[int]:
    """'7000,2000,1000' (counts) or '0.7,0.2,0.1' (fractions of the sample) -> three counts."""
    try:
        parts = parse_split(split)
    except ValueError as e:
        raise LoralabError(f"--split: {e}") from None
    if sum(parts) > 1 and all(p == int(p) for p in parts):
        sizes = [int(p) for p in parts]
        if sample is not None and sample < sum(sizes):
            raise LoralabError(f"--split {split}: asks for {sum(sizes)} records but --sample is {sample}")
    elif sum(parts) > 1 + 1e-9:
        raise LoralabError(f"--split {split}: fractions add up to {sum(parts):g}; expected at most 1")
    else:
        pool = min(available, sample or available)
        sizes = [round(p * pool) for p in parts]
        if abs(sum(parts) - 1) < 1e-9:
            sizes[0] = pool - sizes[1] - sizes[2]  # fractions of the whole: every sampled record is used
    need = max(sum(sizes), sample or 0)
    if need > available:
        raise LoralabError(f"{where}: asked for {need} records but only {available} usable records exist")
    return sizes


def prepare(
    source: str,
    output_dir: str | Path = "data",
    seed: int = 42,
    sample: int | None = None,
    split: str = "0.7,0.2,0.1",
    name: str = "alpaca_data",
    dataset: str | None = None,
    max_tokens: int | None = None,
    tokenizer: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Clean, sample and split a source into NAME_{train,val,test}.json + NAME_manifest.json; returns the manifest."""
    out = Path(output_dir)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) or ".." in name:
        # A name is part of file names inside --output-dir: `a/b` or `../x` would write elsewhere.
        raise LoralabError(
            f"--name: expected a file-name prefix of letters, digits, '.', '_' and '-' (no '/' or '..'), got {name!r}"
        )
    if out.exists() and not out.is_dir():
        raise LoralabError(f"--output-dir: {out} is a file; expected a folder (new or existing) for the split files")
    files = {s: out / f"{name}_{s}.json" for s in SPLITS}
    manifest_path = out / f"{name}_manifest.json"
    if not overwrite:
        for path in [*files.values(), manifest_path]:
            if path.exists():
                raise LoralabError(f"{path}: already exists; pass --overwrite to replace it")
    if max_tokens is not None and not tokenizer:
        raise LoralabError("--max-tokens: needs --tokenizer MODEL_DIR to count tokens")
    if sample is not None and sample <= 0:
        raise LoralabError(f"--sample: expected a positive number of records, got {sample}")
    split_sizes(split, sample, 10**12, "")  # bad --split fails before the (slow) read

    where = f"{source}:{dataset}" if dataset else source
    records, spec, source_sha = load_source(source, dataset)
    convs = to_conversations(records, spec, where)

    # Clean the whole source first, so the sample is drawn from usable records only.
    dropped = {"empty_output": 0, "duplicate": 0, "too_long": 0}
    keep, seen = [], set()
    for i, msgs in enumerate(convs):
        if not msgs or msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            dropped["empty_output"] += 1
            continue
        h = content_hash(msgs)
        if h in seen:  # exact duplicate (same content); deduping here is what keeps splits disjoint
            dropped["duplicate"] += 1
            continue
        seen.add(h)
        keep.append(i)
    if max_tokens is not None:
        lengths = count_tokens(tokenizer, [convs[i] for i in keep])
        dropped["too_long"] = sum(n > max_tokens for n in lengths)
        keep = [i for i, n in zip(keep, lengths) if n <= max_tokens]
    log.info(
        "%s: %d records (%s); dropped %d with empty output, %d duplicates, %d over max_tokens=%s; %d usable",
        where,
        len(records),
        format_name(spec),
        dropped["empty_output"],
        dropped["duplicate"],
        dropped["too_long"],
        max_tokens,
        len(keep),
    )

    if not keep:
        raise LoralabError(
            f"{where}: no usable record ({len(records)} read; {dropped['empty_output']} without an "
            f"answer, {dropped['duplicate']} duplicates, {dropped['too_long']} over --max-tokens)"
        )
    # Sample and split with our own seeded RNG (never the global one): same input + seed -> same bytes.
    sizes = split_sizes(split, sample, len(keep), where)
    asked = parse_split(split)
    empty = [s for s, size, part in zip(SPLITS, sizes, asked) if size == 0 and (part > 0 or s == "train")]
    if empty:
        raise LoralabError(
            f"--split {split}: the {' and '.join(empty)} split would be empty ({len(keep)} usable "
            "records); ask for more records per split or use fractions of a larger sample"
        )
    order = list(keep)
    random.Random(seed).shuffle(order)
    chunks, start = {}, 0
    for s, size in zip(SPLITS, sizes):
        chunks[s], start = order[start : start + size], start + size
    hashes = [content_hash(convs[i]) for s in SPLITS for i in chunks[s]]
    assert len(set(hashes)) == len(hashes), "a record landed in two splits"

    info = read_dataset_info(out)  # read (and validate) before writing anything
    out.mkdir(parents=True, exist_ok=True)
    split_sha = {}
    for s in SPLITS:
        blob = dump_json([records[i] for i in chunks[s]])
        files[s].write_bytes(blob)
        split_sha[s] = sha256_bytes(blob)

    # Register the splits for LLaMA-Factory, keeping every other entry of an existing file.
    for s in SPLITS:
        info[f"{name}_{s}"] = {"file_name": files[s].name, **spec}
    (out / "dataset_info.json").write_bytes(dump_json(info))

    manifest = {
        "loralab_version": __version__,
        "source": {"path": source, "dataset": dataset, "sha256": source_sha, "records": len(records)},
        "format": format_name(spec),
        "seed": seed,
        "sample": sample,
        "split": split,
        "max_tokens": max_tokens,
        "tokenizer": tokenizer,
        "dropped": dropped,
        "counts": {"requested": dict(zip(SPLITS, sizes)), "actual": {s: len(chunks[s]) for s in SPLITS}},
        "files": {s: {"file_name": files[s].name, "sha256": split_sha[s]} for s in SPLITS},
    }
    manifest_path.write_bytes(dump_json(manifest))
    log.info("wrote %s: train %d, val %d, test %d", out, *sizes)
    return manifest


# --- the other stages: named datasets -> conversations ------------------------------------------
def _load_named(names: str, cfg: Config) -> list[list[dict]]:
    """Comma-separated dataset names (dataset_info.json in cfg.dataset_dir) or file paths -> conversations."""
    import numpy as np

    folder = Path(cfg.dataset_dir)
    info = read_dataset_info(folder)
    convs: list[list[dict]] = []
    # LLaMA-Factory seeds numpy's global generator with the seed before reading any data, and each entry with
    # num_samples draws from it in turn, so the datasets of one list share one generator here too.
    sampler = np.random.RandomState(cfg.seed)
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name in info:
            records, spec, _ = _load_entry(folder, name)
            records = sample_records(records, info[name].get("num_samples"), sampler, name)
        elif path := next((p for p in (Path(name), folder / name) if p.is_file()), None):
            records = read_records(path)
            spec = detect_spec(records, str(path))
        else:
            raise LoralabError(
                f"dataset `{name}`: not in {folder / 'dataset_info.json'} and not a file; create it with "
                f"`loralab prepare SOURCE -o {folder}` (or set dataset_dir to the folder that has it)"
            )
        if cfg.max_samples is not None:
            records = records[: cfg.max_samples]  # the first N, as LLaMA-Factory does
        convs += to_conversations(records, spec, name, skip_bad=True)
    return convs


def sample_records(records: list, num_samples: int | None, sampler, name: str) -> list:
    """A dataset_info.json entry's num_samples, as LLaMA-Factory samples them: a random permutation of the
    records cut to num_samples, then, when it asks for more than there are, records drawn with repetition.
    `sampler`: a numpy RandomState (LLaMA-Factory: numpy's global one, seeded with the run's seed)."""
    if num_samples is None:
        return records
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise LoralabError(f"dataset_info.json: `{name}`: num_samples must be a positive integer, got {num_samples!r}")
    order = list(sampler.permutation(len(records))[:num_samples])
    if num_samples > len(order):
        order += list(sampler.choice(len(records), num_samples - len(order)))
    return [records[i] for i in order]


def load_conversations(cfg: Config, which: str) -> list[list[dict]]:
    """Conversations of the 'train', 'eval' or 'test' data of a config.

    With no eval_dataset and val_size > 0, 'eval' is a seeded hold-out of the training data and
    'train' is the rest (the same split every time for the same seed). 'eval' and 'test' keep only
    their first eval_max_samples / test_max_samples conversations when those are set (`subset_cap`).
    """
    if which not in ("train", "eval", "test"):
        raise ValueError(f"which must be train, eval or test, got {which!r}")
    cap = subset_cap(cfg, which)
    limit = cap[1] if cap else None
    if which == "test":
        return _load_named(cfg.test_dataset, cfg)[:limit]
    if which == "eval" and cfg.eval_dataset is not None:
        return _load_named(cfg.eval_dataset, cfg)[:limit]
    if which == "eval" and cfg.val_size <= 0:
        return []
    convs = _load_named(cfg.dataset, cfg)
    if cfg.eval_dataset is not None or cfg.val_size <= 0:
        return convs
    return split_off_validation(convs, cfg.val_size, cfg.seed)[which == "eval"][:limit]


def split_off_validation(convs: list, val_size: float, seed: int) -> tuple[list, list]:
    """(train, validation) as LLaMA-Factory's val_size split (datasets' train_test_split with the seed): a
    permutation from numpy's default_rng(seed); the first ceil(val_size x N) records (or val_size records when
    it is a count) are the validation set, the rest the training set, both in the permutation's order. The
    hold-out is drawn from the whole training data, so capping it never moves a record into training."""
    import numpy as np

    n_val = int(val_size) if val_size >= 1 else math.ceil(val_size * len(convs))
    if n_val >= len(convs):
        raise LoralabError(f"val_size: {val_size} of {len(convs)} training records leaves none for training")
    order = np.random.default_rng(seed).permutation(len(convs))
    return [convs[i] for i in order[n_val:]], [convs[i] for i in order[:n_val]]


def subset_cap(cfg: Config, which: str) -> tuple[str, int] | None:
    """(key, N) when the config keeps only the first N records of the 'eval' or 'test' data, else None.

    A CPU user cannot afford a validation loss over 2,000 records at every validation, nor 1,000 test
    answers per model; the split files stay whole, so the cap is a setting that can be lifted later.
    """
    key = {"eval": "eval_max_samples", "test": "test_max_samples"}.get(which)
    n = getattr(cfg, key) if key else None
    return (key, n) if n is not None else None


def with_prepared_data(cfg: Config, force: bool = False) -> Config:
    """A config with data_source uses the splits prepared from it (by `loralab run` and `loralab sweep`).

    The splits are prepared once into dataset_dir and reused while their manifest says they were made
    from the same source, seed, sample and split; other settings are an error unless `force`.
    """
    if not cfg.data_source:
        return cfg
    cfg = cfg.model_copy(
        update={
            "dataset": f"{cfg.data_name}_train",
            "eval_dataset": f"{cfg.data_name}_val",
            "test_dataset": f"{cfg.data_name}_test",
        }
    )
    folder = Path(cfg.dataset_dir)
    manifest_path = folder / f"{cfg.data_name}_manifest.json"
    wanted = {"source": cfg.data_source, "seed": cfg.seed, "sample": cfg.data_sample, "split": cfg.data_split}
    if manifest_path.is_file() and not force:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        found = {
            "source": manifest["source"]["path"],
            "seed": manifest["seed"],
            "sample": manifest["sample"],
            "split": manifest["split"],
        }
        if found != wanted:
            diff = ", ".join(f"{k}={found[k]!r} (wanted {wanted[k]!r})" for k in wanted if found[k] != wanted[k])
            raise LoralabError(
                f"dataset_dir: {folder} holds splits prepared with other settings ({diff}); "
                "set dataset_dir to another folder, or pass --force to prepare them again"
            )
        log.info("prepare: reusing the splits in %s (same source, seed, sample and split)", folder)
        return cfg
    log.info("prepare: %s -> %s", cfg.data_source, folder)
    prepare(
        cfg.data_source,
        output_dir=folder,
        seed=cfg.seed,
        sample=cfg.data_sample,
        split=cfg.data_split,
        name=cfg.data_name,
        overwrite=force,
    )
    return cfg
