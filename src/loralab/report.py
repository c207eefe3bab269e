"""`loralab report DIR`: one static page (report.html, plus report.md) for a run, an evaluation, an
experiment (`loralab run`) or a sweep folder.

The page works offline: plots are PNG files (matplotlib, Agg) written to DIR/report_files/ and also
embedded in the HTML as data: URIs, so report.html can be mailed on its own. Everything shown is read
from files the other stages wrote (metrics.jsonl, train_results.json, metrics.json, comparison.json,
generated_predictions.jsonl, and a sweep's trials.json / leaderboard.csv / sweep_results.json).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from loralab import __version__
from loralab.errors import LoralabError
from loralab.leaderboard import leaderboard_columns

log = logging.getLogger(__name__)

FILES_DIR = "report_files"
N_EXAMPLES = 5
# Metrics drawn in the bar chart (all of them are in the tables).
PLOT_METRICS = ("rougeL", "rouge1", "sacrebleu", "predict_rouge-l", "predict_bleu-4")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        continue  # a line being written right now
                if limit is not None and len(rows) >= limit:
                    break
    except OSError:
        pass
    return rows


# --- what a folder holds ----------------------------------------------------------------------------
@dataclass
class Found:
    kind: str
    runs: dict[str, Path] = field(default_factory=dict)  # name -> run folder (has metrics.jsonl)
    comparisons: list[tuple[Path, dict]] = field(default_factory=list)  # evaluate_models' comparison.json
    evaluations: dict[str, Path] = field(default_factory=dict)  # name -> eval folder (metrics.json), standalone
    sweep: dict | None = None


def _run_dirs(folder: Path) -> dict[str, Path]:
    runs = {}
    for depth in ("", "*/", "*/*/"):
        for path in sorted(folder.glob(f"{depth}metrics.jsonl")):
            run = path.parent
            if run.name.startswith("checkpoint-"):
                continue
            runs[str(run.relative_to(folder)) if run != folder else folder.name] = run
    return runs


def collect(folder: Path) -> Found:
    """Find runs, evaluations and sweep files in `folder` (and up to two levels below)."""
    if (folder / "sweep.yaml").is_file() and (folder / "trials.json").is_file():
        found = Found("sweep")
        found.sweep = {
            "spec": _yaml(folder / "sweep.yaml"),
            "trials": _read_json(folder / "trials.json") or [],
            "leaderboard": _read_csv(folder / "leaderboard.csv"),
            "importance": _read_json(folder / "importance.json") or {},
            "results": _read_json(folder / "sweep_results.json"),
        }
    elif (folder / "stages.json").is_file():
        found = Found("experiment")
    elif (folder / "train_results.json").is_file() or (folder / "metrics.jsonl").is_file():
        found = Found("run")
    else:
        found = Found("evaluation")
    found.runs = _run_dirs(folder)
    seen: set[Path] = set()
    for depth in ("", "*/", "*/*/"):
        for path in sorted(folder.glob(f"{depth}comparison.json")):
            summary = _read_json(path)
            if isinstance(summary, dict) and isinstance(summary.get("models"), dict):
                found.comparisons.append((path.parent, summary))
                seen.update(p.parent.resolve() for p in path.parent.glob("*/metrics.json"))
    for depth in ("", "*/", "*/*/"):
        for path in sorted(folder.glob(f"{depth}metrics.json")):
            ev = path.parent
            if ev.resolve() in seen or ev.name == "val_generation" or found.kind == "sweep":
                continue  # part of a comparison, or a sweep trial's validation subset
            result = _read_json(path)
            if isinstance(result, dict) and isinstance(result.get("metrics"), dict):
                found.evaluations[str(ev.relative_to(folder)) if ev != folder else folder.name] = ev
    if found.kind == "evaluation" and not (found.comparisons or found.evaluations or found.runs):
        raise LoralabError(
            f"{folder}: nothing to report; expected a run folder (metrics.jsonl, train_results.json), "
            "an evaluation folder (metrics.json, comparison.json), an experiment or a sweep folder"
        )
    return found


def _yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _read_csv(path: Path) -> list[dict]:
    try:
        with path.open(encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


# --- plots ------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, files: Path, name: str) -> Path:
    files.mkdir(parents=True, exist_ok=True)
    path = files / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def plot_losses(runs: dict[str, Path], files: Path, highlight: str | None = None) -> Path | None:
    """Training and validation loss against step; several runs overlaid (a sweep's trials). A third panel
    shows the ROUGE-L of validation replies when a run generated them (eval_generate_samples)."""
    curves = {name: _read_jsonl(run / "metrics.jsonl") for name, run in runs.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    panels = [("loss", "training loss"), ("eval_loss", "validation loss")]
    if any("eval_rougeL" in r for records in curves.values() for r in records):
        panels.append(("eval_rougeL", "validation replies: rougeL"))
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        for name, records in curves.items():
            points = [(r["step"], r[key]) for r in records if key in r and r.get(key) is not None]
            if not points:
                continue
            strong = highlight is not None and name == highlight
            ax.plot(
                *zip(*points),
                marker="o" if len(points) < 25 else None,
                markersize=3,
                linewidth=2.5 if strong else 1.2,
                alpha=1.0 if strong or highlight is None else 0.6,
                label=name + (" (winner)" if strong else ""),
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines and len(curves) <= 12:
            ax.legend(fontsize=7)
    return _save(fig, files, "losses")


def plot_metrics(models: dict[str, dict], files: Path, name: str = "test_metrics") -> Path | None:
    """Bar chart of the main metrics of each model with their 95% CIs."""
    keys = [k for k in PLOT_METRICS if all(k in m for m in models.values())]
    if not models or not keys:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(models)
    for i, (model, metrics) in enumerate(models.items()):
        xs = [j + i * width for j in range(len(keys))]
        vals = [metrics[k]["value"] for k in keys]
        errs = [
            [v - metrics[k]["ci_low"] for k, v in zip(keys, vals)],
            [metrics[k]["ci_high"] - v for k, v in zip(keys, vals)],
        ]
        ax.bar(xs, vals, width, yerr=errs, capsize=3, label=model)
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(keys))], keys)
    ax.set_ylabel("score (x100), 95% CI")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, files, name)


def plot_params(trials: list[dict], keys: list[str], objective: str, files: Path) -> Path | None:
    """The objective of each finished trial against each swept parameter."""
    done = [
        t
        for t in trials
        if t.get("state") == "COMPLETE" and t.get("value") is not None and "skipped" not in t.get("user_attrs", {})
    ]
    if not done or not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(t["params"].get(key), t["value"]) for t in done if key in t["params"]]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points)
        if numeric:
            ax.scatter([x for x, _ in points], [y for _, y in points])
            dist = next((t["distributions"].get(key) for t in done if key in t.get("distributions", {})), None)
            if dist and '"log": true' in dist:
                from matplotlib.ticker import LogLocator, NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.xaxis.set_minor_formatter(NullFormatter())  # no overlapping 2x10^-4 labels
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        else:
            cats = sorted({str(x) for x, _ in points})
            ax.scatter([cats.index(str(x)) for x, _ in points], [y for _, y in points])
            ax.set_xticks(range(len(cats)), cats, rotation=20, fontsize=8)
        ax.set_xlabel(key)
        ax.set_ylabel(f"validation {objective}")
        ax.grid(alpha=0.3)
    return _save(fig, files, "objective_vs_params")


def plot_importance(importance: dict, files: Path) -> Path | None:
    scores = importance.get("ped_anova") or {k: v["spread"] for k, v in importance.get("spread", {}).items()}
    if not scores or not any(scores.values()):  # nothing to draw: every parameter scored 0
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(scores)))
    names = list(scores)[::-1]
    ax.barh(names, [scores[n] for n in names])
    ax.set_xlabel("PED-ANOVA importance" if importance.get("ped_anova") else "spread of the mean objective over values")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, files, "importance")


# --- page building: each section is (title, markdown, html) ----------------------------------------------
class Page:
    def __init__(self, title: str, folder: Path):
        self.title, self.folder = title, folder
        self.md: list[str] = [f"# {title}\n"]
        self.html: list[str] = []

    def heading(self, text: str) -> None:
        self.md.append(f"\n## {text}\n")
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, header: list[str], rows: list[list]) -> None:
        cells = [[_cell(c) for c in row] for row in rows]
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        for row in cells:
            self.md.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |")
        self.md.append("")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
        self.html.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def image(self, path: Path | None, alt: str) -> None:
        if path is None:
            return
        rel = path.relative_to(self.folder).as_posix()
        self.md.append(f"![{alt}]({rel})\n")
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        self.html.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(alt)} ({html.escape(rel)})</figcaption></figure>"
        )

    def examples(self, columns: dict[str, list[str]], prompts: list[str]) -> None:
        """Side by side: prompt, then one column per model and the reference."""
        names = list(columns)
        self.md.append("| # | prompt | " + " | ".join(names) + " |")
        self.md.append("|" + "---|" * (len(names) + 2))
        rows_html = []
        for i, prompt in enumerate(prompts):
            texts = [columns[n][i] if i < len(columns[n]) else "" for n in names]
            self.md.append(f"| {i} | " + " | ".join(_md_text(t) for t in [prompt, *texts]) + " |")
            rows_html.append(
                f"<tr><td>{i}</td>"
                + "".join(f"<td><pre>{html.escape(_clip(t))}</pre></td>" for t in [prompt, *texts])
                + "</tr>"
            )
        self.md.append("")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in ["#", "prompt", *names])
        self.html.append(
            f"<table class='examples'><thead><tr>{head}</tr></thead><tbody>{''.join(rows_html)}</tbody></table>"
        )

    def render_html(self) -> str:
        return (
            "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>"
            + "\n".join(self.html)
            + f"<footer>loralab {html.escape(__version__)} · {time.strftime('%Y-%m-%d %H:%M')}</footer></body></html>\n"
        )


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222;
padding:0 1em}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tbody tr:nth-child(even){background:#fafafa}
table.examples td{max-width:330px}pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.92em}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{font-size:.8em;color:#666}
footer{margin-top:3em;color:#888;font-size:.8em}
"""


def _cell(v) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def user_text(prompt: str) -> str:
    """The last user message of a rendered chat prompt (ChatML, Llama 3, ...), else the prompt as is.

    generated_predictions.jsonl keeps the rendered prompt with its special tokens; for reading, the
    user's words are what matter."""
    parts = re.split(r"<\|[^|>]+\|>", prompt)
    for i in range(len(parts) - 1, -1, -1):
        head, _, rest = parts[i].lstrip("\n").partition("\n")
        if parts[i].strip() == "user" and i + 1 < len(parts):  # Llama 3: role and text are separate pieces
            return parts[i + 1].strip() or prompt
        if head.strip() == "user" and rest.strip():  # ChatML: "user\ntext"
            return rest.strip()
    return prompt


def _clip(text: str, n: int = 600) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + " …"


def _md_text(text: str) -> str:
    return html.escape(_clip(text, 300)).replace("|", "\\|").replace("\n", "<br>")


def _space_text(space) -> str:
    if isinstance(space, dict):  # a range
        text = f"{space.get('low'):g} to {space.get('high'):g}"
        return (
            text
            + (" (log scale)" if space.get("log") else "")
            + (f", step {space['step']:g}" if space.get("step") else "")
        )
    return ", ".join(str(v) for v in space)


def _num(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# --- sections ---------------------------------------------------------------------------------------------
def metric_table(page: Page, metrics: dict) -> None:
    page.table(
        ["metric", "value", "95% CI low", "95% CI high"],
        [[k, m.get("value"), m.get("ci_low"), m.get("ci_high")] for k, m in metrics.items()],
    )


def models_table(page: Page, models: dict[str, dict]) -> None:
    """Metrics of several models on one split: metric | model A [CI] | model B [CI] ..."""
    names = list(models)
    keys = [k for k in next(iter(models.values()))]
    rows = []
    for k in keys:
        row = [k]
        for n in names:
            m = models[n].get(k)
            row.append(f"{m['value']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]" if m else "")
        rows.append(row)
    page.table(["metric", *[f"{n} (95% CI)" for n in names]], rows)


def headline(comparison: dict, names=("rougeL", "sacrebleu", "exact_match")) -> str:
    """'rougeL 12.30 -> 15.60 (+3.30, 95% CI [+1.0, +5.6], p=0.010); ...' for a paired comparison."""
    parts = []
    for k in names:
        m = comparison["metrics"].get(k)
        if m:
            parts.append(
                f"{k} {m['value_a']:.2f} -> {m['value_b']:.2f} ({m['delta']:+.2f}, 95% CI "
                f"[{m['ci_low']:+.2f}, {m['ci_high']:+.2f}], p={m['p_value']:.3f})"
            )
    return f"{comparison.get('a', 'A')} -> {comparison.get('b', 'B')}: " + "; ".join(parts) + "."


def paired_table(page: Page, comparison: dict) -> None:
    a, b = comparison.get("a", "A"), comparison.get("b", "B")
    rows = [
        [
            k,
            m["value_a"],
            m["value_b"],
            f"{m['delta']:+.2f}",
            f"[{m['ci_low']:+.2f}, {m['ci_high']:+.2f}]",
            f"{m['p_value']:.3f}",
        ]
        for k, m in comparison["metrics"].items()
    ]
    page.table(["metric", a, b, f"{b} - {a}", "95% CI of the difference", "p (paired)"], rows)
    n = comparison.get("n_samples")
    page.para(f"{n} paired samples; {comparison.get('ci', 'paired bootstrap CI')}; {comparison.get('test', '')}.")


def comparison_section(
    page: Page, folder: Path, eval_dir: Path, summary: dict, name: str, title: str | None = None
) -> None:
    models = {k: v["metrics"] for k, v in summary["models"].items()}
    split = summary.get("split") or summary.get("data")
    # evaluate_models writes OUT/NAME/; the recorded "dir" may be relative to another working folder
    dirs = {
        k: eval_dir / k if (eval_dir / k).is_dir() else Path(v.get("dir", "")) for k, v in summary["models"].items()
    }
    capped = "".join(f", the first records: {k}={v}" for k, v in (summary.get("capped_by") or {}).items())
    where = f" on {split} ({summary.get('n_samples')} samples{capped})" if split else ""
    page.heading((title or "Evaluation") + where)
    page.para(
        "Models: "
        + ", ".join(f"{k} = {v.get('adapter') or summary.get('model')}" for k, v in summary["models"].items())
        + f". Folder: {eval_dir.relative_to(folder) if eval_dir != folder else '.'}"
    )
    models_table(page, models)
    answers_table(page, {k: _read_json(d / "metrics.json") or {} for k, d in dirs.items()})
    page.image(plot_metrics(models, folder / FILES_DIR, f"metrics_{name}"), f"metrics with 95% CIs ({split})")
    for comp in summary.get("comparisons", {}).values():
        page.heading(f"{comp.get('b')} vs {comp.get('a')} (paired)")
        paired_table(page, comp)
        if comp.get("a") in dirs and comp.get("b") in dirs:
            wins_and_losses_section(page, comp["a"], comp["b"], dirs[comp["a"]], dirs[comp["b"]])
    examples_section(page, dirs)


def answers_table(page: Page, results: dict[str, dict]) -> None:
    """What the answers are, beyond n-gram overlap: exact match, lengths, replies cut at max_new_tokens."""
    rows = []
    for name, result in results.items():
        em, lengths = (result.get("metrics") or {}).get("exact_match"), result.get("lengths") or {}
        if em is None and not lengths:
            continue  # scored before these metrics existed
        cut = lengths.get("hit_max_new_tokens")
        rows.append(
            [
                name,
                f"{em['value']:.1f} [{em['ci_low']:.1f}, {em['ci_high']:.1f}]" if em else "",
                lengths.get("mean_pred_words"),
                lengths.get("mean_label_words"),
                lengths.get("ratio"),
                f"{cut:.0f}% ({lengths.get('n_hit_max_new_tokens')})" if cut is not None else "unknown",
            ]
        )
    if not rows:
        return
    page.table(
        [
            "model",
            "exact match % (95% CI)",
            "generated words (mean)",
            "reference words (mean)",
            "generated / reference",
            "hit max_new_tokens",
        ],
        rows,
    )
    page.para(
        "Exact match: the reply equals the reference after SQuAD normalization (lowercase, no punctuation, "
        "no a/an/the, single spaces); a reply in the right format with a wrong answer scores 0 here even when "
        "its BLEU/ROUGE is high. Lengths are counted in whitespace-separated words."
    )


def biggest_changes(
    rows_a: list[dict], rows_b: list[dict], key: str = "rougeL", n: int = 5
) -> tuple[list[int], list[int]]:
    """Sample indices where B beat A by most (wins) and lost to A by most (losses) on a per-sample score."""
    deltas = [
        (row_b[key] - row_a[key], i)
        for i, (row_a, row_b) in enumerate(zip(rows_a, rows_b))
        if key in row_a and key in row_b
    ]
    wins = [i for d, i in sorted(deltas, key=lambda t: (-t[0], t[1])) if d > 0][:n]
    losses = [i for d, i in sorted(deltas, key=lambda t: (t[0], t[1])) if d < 0][:n]
    return wins, losses


def wins_and_losses_section(page: Page, a: str, b: str, dir_a: Path, dir_b: Path, key: str = "rougeL") -> None:
    """The samples where B gained or lost most against A (per-sample scores of `loralab eval`)."""
    rows_a, rows_b = _read_jsonl(dir_a / "per_sample_scores.jsonl"), _read_jsonl(dir_b / "per_sample_scores.jsonl")
    if not rows_a or len(rows_a) != len(rows_b):
        return
    wins, losses = biggest_changes(rows_a, rows_b, key, N_EXAMPLES)
    better = sum(rb[key] > ra[key] for ra, rb in zip(rows_a, rows_b))
    worse = sum(rb[key] < ra[key] for ra, rb in zip(rows_a, rows_b))
    page.heading(f"Biggest wins and losses of {b} vs {a} (per-sample {key})")
    page.para(
        f"{b} scores higher than {a} on {better} of {len(rows_a)} samples, lower on {worse}, the same on "
        f"{len(rows_a) - better - worse}."
    )
    for label, picked in ((f"Wins: where {b} gained most", wins), (f"Losses: where {b} lost most", losses)):
        if not picked:
            continue
        page.para(f"{label} ({len(picked)} samples; # = 0-based sample index in the evaluated data):")
        rows = [
            [
                i,
                _clip(user_text(rows_a[i].get("prompt", "")), 300),
                _clip(rows_a[i].get("predict", ""), 300),
                _clip(rows_b[i].get("predict", ""), 300),
                _clip(rows_a[i].get("label", ""), 300),
                f"{rows_a[i][key]:.1f} -> {rows_b[i][key]:.1f}",
                f"{rows_a[i].get('exact_match', 0):.0f} -> {rows_b[i].get('exact_match', 0):.0f}"
                if "exact_match" in rows_a[i] and "exact_match" in rows_b[i]
                else "",
            ]
            for i in picked
        ]
        page.table(["#", "prompt", a, b, "reference", key, "exact match"], rows)


def examples_section(page: Page, model_dirs: dict[str, Path]) -> None:
    preds = {}
    for name, d in model_dirs.items():
        rows = _read_jsonl(d / "generated_predictions.jsonl", limit=N_EXAMPLES)
        if rows:
            preds[name] = rows
    if not preds:
        return
    first = next(iter(preds.values()))
    columns = {name: [r.get("predict", "") for r in rows] for name, rows in preds.items()}
    columns["reference"] = [r.get("answer", r.get("label", "")) for r in first]  # answer: the clean label
    page.heading(f"Example predictions (first {len(first)})")
    page.examples(columns, [user_text(r.get("prompt", "")) for r in first])


def run_section(page: Page, folder: Path, runs: dict[str, Path], highlight: str | None = None) -> None:
    summaries = {name: _read_json(run / "train_results.json") for name, run in runs.items()}
    rows = [
        [
            name,
            s.get("steps"),
            s.get("best_step"),
            s.get("best_eval_loss"),
            s.get("train_loss"),
            s.get("tokens_per_s"),
            s.get("runtime_s"),
        ]
        for name, s in summaries.items()
        if isinstance(s, dict)
    ]
    if rows:
        page.heading("Training")
        page.table(
            ["run", "steps", "best step", "best validation loss", "mean training loss", "tokens/s", "runtime (s)"], rows
        )
    path = plot_losses(runs, folder / FILES_DIR, highlight)
    if path:
        page.heading("Loss curves")
        page.image(path, "training and validation loss" + (" (all trials)" if len(runs) > 1 else ""))


def sweep_section(page: Page, folder: Path, found: Found) -> None:
    sweep = found.sweep
    spec, trials, board = sweep["spec"], sweep["trials"], sweep["leaderboard"]
    results = sweep["results"]
    objective = spec.get("objective", "eval_loss")
    keys = list(spec.get("search_space", {}))
    counts: dict[str, int] = {}
    for row in board:
        counts[row.get("state", "?")] = counts.get(row.get("state", "?"), 0) + 1
    page.heading("Sweep")
    page.para(
        f"Strategy {spec.get('strategy')}, objective: validation {objective} ({spec.get('direction')}), "
        f"budget {spec.get('n_trials')} trials, storage: {spec.get('storage')}. Trials: "
        + ", ".join(f"{n} {s}" for s, n in counts.items())
        + ". Selection used the validation split only."
    )
    page.table(["parameter", "searched over"], [[k, _space_text(v)] for k, v in spec.get("search_space", {}).items()])
    if results:
        page.heading(f"Winner: trial {results['best_trial']}")
        base = spec.get("base") or {}
        ratio = (base.get("lora_alpha") or 2 * base.get("lora_rank", 8)) / base.get("lora_rank", 8)
        page.table(
            ["parameter", "base config", "winner"],
            [[k, ratio if k == "lora_alpha_ratio" else base.get(k), v] for k, v in results["best_params"].items()],
        )
        comp = (results.get("test") or {}).get("comparison")
        if results.get("winner_is_base"):
            page.para(
                "The starting config itself was the best trial: no other configuration beat it on validation, "
                "so there is no tuned-vs-base comparison; its test scores are below."
            )
        if comp:
            page.para(f"Test split ({comp.get('n_samples')} samples, read once after selection): " + headline(comp))
        page.para(
            f"Validation {objective} of the winner: {results['best_value']:.4f}. Run folder: {results['tuned_run']}. "
            f"Base config run: {results['base_run']}"
            + (f" (it was trial {results['base_is_trial']})." if results.get("base_is_trial") is not None else ".")
        )
        recipes_section(page, results, objective)
    page.heading("Leaderboard")
    if board:
        cols = leaderboard_columns(objective, keys)
        head = [f"validation {objective}" if c in ("objective", objective) and c not in keys else c for c in cols]
        page.table(
            head,
            [
                [
                    _num(r.get(c)) if _num(r.get(c)) is not None and c not in ("rank", "trial", "steps") else r.get(c)
                    for c in cols
                ]
                for r in board
            ],
        )
    page.image(
        plot_params(trials, keys, objective, folder / FILES_DIR),
        f"validation {objective} of each finished trial against each parameter",
    )
    imp = sweep["importance"]
    if imp.get("spread"):
        page.heading("Parameter importance")
        rows = [
            [
                k,
                (imp.get("ped_anova") or {}).get(k),
                v["spread"],
                ", ".join(f"{g}: {m:.4g}" for g, m in v["groups"].items()),
            ]
            for k, v in imp["spread"].items()
        ]
        page.table(["parameter", "PED-ANOVA importance", "spread of mean objective", "mean objective by value"], rows)
        note = (
            f"From {imp.get('n_complete')} finished trials. PED-ANOVA (Optuna) compares the parameter's distribution "
            "in the best trials with all trials; the spread is the largest difference between the mean objective "
            "of two values (numeric parameters binned in thirds). With few trials both are rough indications."
        )
        if imp.get("ped_anova_error"):
            note += f" PED-ANOVA was not computed: {imp['ped_anova_error']}"
        page.para(note)
        page.image(plot_importance(imp, folder / FILES_DIR), "parameter importance")
    listed = {str(r.get("trial")) for r in board}  # the leaderboard's trials: not replaced or skipped ones
    runs = {
        f"trial {int(t['number'])}": folder / "trials" / f"trial_{int(t['number']):03d}"
        for t in trials
        if str(t["number"]) in listed
    }
    runs = {name: run for name, run in runs.items() if (run / "metrics.jsonl").is_file()}
    winner = f"trial {results['best_trial']}" if results else None
    path = plot_losses(runs, folder / FILES_DIR, winner)
    if path:
        page.heading("Loss curves of all trials")
        page.image(path, "training and validation loss of every trial (winner bold)")


def recipes_section(page: Page, results: dict, objective: str) -> None:
    """The named recipes (compare_recipes) beside the winner: validation score and the paired test difference."""
    recipes = results.get("recipes") or {}
    if not recipes:
        return
    comparisons = (results.get("test") or {}).get("recipe_comparisons") or {}
    page.heading("Named recipes")
    rows = []
    for name, r in recipes.items():
        comp = comparisons.get(name) or {}
        cells = []
        for metric in ("rougeL", "exact_match"):
            m = (comp.get("metrics") or {}).get(metric)
            cells.append(
                f"{m['delta']:+.2f} [{m['ci_low']:+.2f}, {m['ci_high']:+.2f}], p={m['p_value']:.3f}" if m else ""
            )
        settings = ", ".join(f"{k}={v}" for k, v in r["keys"].items())
        rows.append([name, settings, _num(r.get("validation")), *cells, r.get("reused") or r.get("run")])
    page.table(
        [
            "recipe",
            "settings (on top of the base config)",
            f"validation {objective}",
            "test rougeL: winner - recipe (95% CI)",
            "test exact match: winner - recipe (95% CI)",
            "run (or the run reused)",
        ],
        rows,
    )
    page.para(
        f"Each recipe was trained at the base config's budget and tested on the same test records as the "
        f"winner (validation {objective} of the winner: {results['best_value']:.4f}). A difference whose CI "
        "includes 0 is no clear difference."
    )


def write_report(folder: str | Path) -> Path:
    """Write FOLDER/report.html and FOLDER/report.md; return the HTML path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LoralabError(f"{folder}: not a folder; expected a run, evaluation, experiment or sweep folder")
    found = collect(folder)
    page = Page(f"loralab report: {folder.name} ({found.kind})", folder)
    page.para(f"Folder: {folder.resolve()}")
    if found.kind == "sweep":
        sweep_section(page, folder, found)
        results = found.sweep["results"]
        if results and results.get("test"):
            test_dir = folder / "test_eval"  # where finalize writes it (the recorded path may be relative)
            summary = _read_json(test_dir / "comparison.json")
            if summary:
                comparison_section(
                    page,
                    folder,
                    test_dir,
                    summary,
                    "test",
                    title="Test split: "
                    + ("base config, named recipes and winner" if results.get("recipes") else "base config vs winner")
                    + " (evaluated once, after selection)",
                )
    else:
        if found.runs:  # training first, then what the trained model scores
            run_section(page, folder, found.runs)
        for eval_dir, summary in found.comparisons:
            comparison_section(page, folder, eval_dir, summary, eval_dir.name)
        for name, ev in found.evaluations.items():
            result = _read_json(ev / "metrics.json")
            page.heading(
                f"Evaluation {name}: {result.get('split') or result.get('data') or ''} "
                f"({result.get('n_samples')} samples)"
            )
            metric_table(page, result["metrics"])
            answers_table(page, {name: result})
            examples_section(page, {"prediction": ev})
    (folder / "report.md").write_text("\n".join(page.md) + "\n", encoding="utf-8")
    out = folder / "report.html"
    out.write_text(page.render_html(), encoding="utf-8")
    log.info("wrote %s and %s", out, folder / "report.md")
    return out
