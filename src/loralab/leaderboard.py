"""A sweep's leaderboard: one row per trial, best first, written beside the trials for `loralab report`.

leaderboard.csv and leaderboard.md (the table), trials.json (everything Optuna knows about every
trial) and importance.json (which swept keys mattered). report.py reads these files; this module
writes them from the Optuna study while the sweep runs.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

from loralab.runinfo import write_json
from loralab.sweep_workers import counted_trials, retry_of


def objective_column(objective: str) -> str:
    """The leaderboard column of the objective: `objective` for the validation loss, else the metric's name."""
    return "objective" if objective == "eval_loss" else objective


def leaderboard_rows(study, objective: str, direction: str, keys: list[str]) -> list[dict]:
    """One row per counted trial: best first (finished trials by objective, then pruned, then failed).

    `keys`: the swept config keys (a column each). A pruned trial shows the validation loss it was
    stopped at (reported to Optuna as -loss when the objective is maximized)."""
    from optuna.trial import TrialState

    sign = 1 if direction == "minimize" else -1
    column = objective_column(objective)
    rows = []
    for t in counted_trials(study.get_trials(deepcopy=False)):
        train = t.user_attrs.get("train") or {}
        value = t.value if t.state == TrialState.COMPLETE else None
        if t.state == TrialState.PRUNED and t.intermediate_values:
            last = max(t.intermediate_values)
            train = {**train, "pruned_at_step": last, "last_eval_loss": sign * t.intermediate_values[last]}
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                column: value,
                **{k: t.params.get(k) for k in keys},
                "best_eval_loss": train.get("best_eval_loss", train.get("last_eval_loss")),
                "best_step": train.get("best_step"),
                "steps": train.get("steps"),
                "tokens_per_s": train.get("tokens_per_s"),
                "runtime_s": train.get("runtime_s"),
                "run_dir": t.user_attrs.get("run_dir"),
                "error": t.user_attrs.get("error"),
                "note": "; ".join(
                    n
                    for n in (
                        "base config" if t.user_attrs.get("base_config") else "",
                        f"retry of trial {retry_of(t)}" if retry_of(t) is not None else "",
                    )
                    if n
                )
                or None,
            }
        )
    order = {"complete": 0, "pruned": 1, "running": 2, "waiting": 3, "fail": 4}
    rows.sort(key=lambda r: (order.get(r["state"], 5), sign * r[column] if r[column] is not None else 0.0, r["trial"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank if r["state"] == "complete" else None
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    return str(v)


def leaderboard_columns(objective: str, keys: list[str]) -> list[str]:
    """The leaderboard's columns, in order: the same in leaderboard.csv/.md and the report."""
    return [
        "rank",
        "trial",
        "state",
        objective_column(objective),
        *keys,
        "best_eval_loss",
        "steps",
        "tokens_per_s",
        "runtime_s",
        "note",
        "error",
    ]


def leaderboard_table(rows: list[dict], objective: str, keys: list[str], markdown: bool = False) -> str:
    column = objective_column(objective)
    cols = leaderboard_columns(objective, keys)
    header = [("val_" + objective) if c == column else c for c in cols]
    cells = [[_fmt(r.get(c))[:60] for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def trials_json(study) -> list[dict]:
    """Everything about every trial (for reports and importance), JSON-ready."""
    from optuna.distributions import distribution_to_json

    out = []
    for t in study.get_trials(deepcopy=False):
        out.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value if t.values else None,
                "params": t.params,
                "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
                "intermediate_values": {str(k): v for k, v in t.intermediate_values.items()},
                "user_attrs": t.user_attrs,
                "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
                "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
            }
        )
    return out


def param_importance(study, keys: list[str]) -> dict:
    """Which parameters mattered: Optuna's PED-ANOVA (numpy only) when there are enough finished trials,
    and always the plain spread of the objective over each parameter's values."""
    from optuna.trial import TrialState

    done = [t for t in counted_trials(study.get_trials(deepcopy=False)) if t.state == TrialState.COMPLETE]
    out: dict[str, Any] = {"n_complete": len(done), "spread": {}}
    for key in keys:
        groups: dict[str, list[float]] = {}
        numeric = all(
            isinstance(t.params.get(key), (int, float)) and not isinstance(t.params.get(key), bool) for t in done
        )
        values = sorted({t.params[key] for t in done if key in t.params}, key=lambda v: (str(type(v)), v))
        if numeric and len(values) > 3:  # bin a continuous parameter into low / middle / high thirds
            edges = [values[len(values) * i // 3] for i in (1, 2)]
            for t in done:
                v = t.params[key]
                name = "low" if v < edges[0] else ("middle" if v < edges[1] else "high")
                groups.setdefault(name, []).append(t.value)
        else:
            for t in done:
                v = t.params.get(key)
                groups.setdefault(f"{v:.4g}" if isinstance(v, float) else str(v), []).append(t.value)
        means = {g: sum(v) / len(v) for g, v in groups.items()}
        out["spread"][key] = {
            "groups": means,
            "spread": (max(means.values()) - min(means.values())) if len(means) > 1 else 0.0,
        }
    if len(done) >= 4 and len([k for k in keys if len({str(t.params.get(k)) for t in done}) > 1]) >= 1:
        try:
            import optuna
            from optuna.importance import PedAnovaImportanceEvaluator

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imp = optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
            out["ped_anova"] = {k: float(v) for k, v in imp.items()}
        except Exception as e:  # too few distinct trials for the estimator: the spread still stands
            out["ped_anova_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def write_leaderboard(study, sweep_dir: Path, objective: str, direction: str, keys: list[str]) -> list[dict]:
    """leaderboard.csv / .md, trials.json and importance.json in the sweep folder; returns the rows."""
    rows = leaderboard_rows(study, objective, direction, keys)
    fields = list(rows[0]) if rows else ["trial", "state"]
    with open(sweep_dir / "leaderboard.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "leaderboard.md").write_text(
        leaderboard_table(rows, objective, keys, markdown=True) + "\n", encoding="utf-8"
    )
    write_json(sweep_dir / "trials.json", trials_json(study))
    write_json(sweep_dir / "importance.json", param_importance(study, keys))
    return rows
