"""Hyperparameter sweeps with Optuna: grid, random or TPE over any config key.

A sweep file says where to start (`base:` an experiment config), what to vary (`search_space:`) and
how to choose (`objective`, `direction`). Every trial is a normal training run in
SWEEP_DIR/trials/trial_NNN, chosen on the validation split only. When the budget is spent, the best
trial, the base config and the named recipes (`compare_recipes`, e.g. LLaMA-Factory's example LoRA
recipe, trained at the base budget in SWEEP_DIR/recipes/NAME) are evaluated once on the test split,
with CIs and a paired comparison of each against the winner.

Trials live in Optuna storage: by default a journal file in the sweep folder (safe with several
processes on one machine), or any RDB URL (postgresql://...) shared by workers on several machines.
Running the same command again resumes: finished trials stay, a trial whose worker died is failed
and queued again with the same parameters (sweep_workers.py: what several workers sharing one study
need beyond Optuna). leaderboard.py writes the leaderboard the report shows.

The recipe, top to bottom (`run_sweep`): sweep file -> checked base config and search space -> the
Optuna study (sampler, pruner, storage) -> trials (each a `train.train` run with a pruning callback,
scored on the validation split) -> leaderboard -> the named recipes trained -> the best trial, the base
config and the recipes tested once.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loralab import data, evaluate, train
from loralab import metrics as metrics_mod
from loralab.config import (
    FIELDS,
    NOT_SEARCHABLE_KEYS,
    RESULT_NEUTRAL_KEYS,
    TRAIN_KEYS,
    Config,
    build_config,
    did_you_mean,
    keys_of,
    load_config,
    read_yaml,
)
from loralab.errors import LoralabError
from loralab.generate import Engine
from loralab.leaderboard import leaderboard_table, write_leaderboard
from loralab.runinfo import write_json
from loralab.sweep_workers import (
    JOURNAL_FILE,
    Skip,
    check_slot,
    counted_trials,
    make_storage,
    recover_dead_trials,
    redact,
    worker_identity,
)

log = logging.getLogger(__name__)

# Keys that are not config fields but set one: lora_alpha = lora_alpha_ratio * lora_rank.
DERIVED_KEYS = {"lora_alpha_ratio": "sets lora_alpha = lora_alpha_ratio * lora_rank"}
SWEEP_FILE = "sweep.yaml"  # the resolved sweep (spec + base config) in the sweep folder
RESULTS_FILE = "sweep_results.json"
TEST_KEYS = keys_of("test")  # which test records the final evaluation reads: never seen by a trial
# Model names of the final test evaluation; a named recipe must not take one of them.
WINNER, BASE_CONFIG = "tuned", "base_config"


# --- the sweep file --------------------------------------------------------------------------------
class Range(BaseModel):
    """A numeric range: {low, high, log, step}. Integer config keys get integers."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)


class SweepSpec(BaseModel):
    """What a sweep file may say."""

    model_config = ConfigDict(extra="forbid")
    base: str | dict[str, Any] = Field(
        ..., description="Experiment config to start from: a YAML path (relative to the sweep file) or inline keys."
    )
    base_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Keys set on top of `base` (e.g. fewer steps for the sweep)."
    )
    strategy: Literal["grid", "random", "tpe"] = Field("tpe", description="grid, random, or tpe (Bayesian).")
    search_space: dict[str, list[Any] | Range] = Field(
        ..., description="config key -> list of values, or {low, high, log, step} (random/tpe only)."
    )
    n_trials: int | None = Field(None, gt=0, description="Trial budget of the whole sweep (grid: default = grid size).")
    timeout_minutes: float | None = Field(
        None, gt=0, description="Stop starting new trials after this long (per worker run)."
    )
    objective: str = Field(
        "eval_loss",
        description="eval_loss, or a metric on a fixed validation subset (rougeL, predict_rouge-l, sacrebleu, ...).",
    )
    objective_samples: int = Field(
        64, gt=0, description="Validation records generated for a generation-metric objective."
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        None, description="Default: minimize eval_loss, maximize metrics."
    )
    storage: str | None = Field(
        None, description="Optuna RDB URL (postgresql://...); default: a journal file in the sweep folder."
    )
    study_name: str | None = Field(None, description="Optuna study name; default: the sweep folder's name.")
    output_dir: str | None = Field(None, description="Sweep folder; default: runs/sweep_<sweep file name>.")
    seed: int = Field(0, description="Sampler seed (grid order; random/tpe mix in the worker's process id).")
    tpe_startup_trials: int | None = Field(
        None,
        ge=1,
        description="tpe: trials drawn at random before TPE models the finished ones; default a third of n_trials, "
        "3 to 10 (Optuna's own default, 10, would make a sweep of 10 trials or fewer a random search).",
    )
    pruner: Literal["median", "none"] = Field("median", description="Stop bad trials early from their validation loss.")
    pruner_startup_trials: int = Field(2, ge=0, description="Trials that finish before pruning starts.")
    pruner_warmup_steps: int = Field(0, ge=0, description="Steps of a trial before it can be pruned.")
    start_with_base: bool = Field(
        True,
        description="random/tpe: the first trial is the base config itself, when its values lie in the search space.",
    )
    heartbeat_seconds: int = Field(
        60, gt=0, description="RDB storage: a trial without a heartbeat for 2x this is failed and re-queued."
    )
    compare_recipes: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Named recipes, e.g. {llamafactory_example: {lora_rank: 8, learning_rate: 1.0e-4}}: each is "
        "trained at the base budget (base + base_overrides + its keys) and tested beside the winner and the base.",
    )


def _spec_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        hint = did_you_mean(key.split(".")[-1], [*SweepSpec.model_fields, *Range.model_fields])
        return f"{source}: unknown key `{key}`{hint}"
    got = first.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    return f"{source}: `{key}`: {first['msg']}{shown}"


def _is_int_key(key: str) -> bool:
    return Config.model_fields[key].annotation in (int, int | None)


def _base_values(spec: SweepSpec, sweep_path: Path) -> tuple[dict, str]:
    if isinstance(spec.base, dict):
        return dict(spec.base), f"{sweep_path}: base"
    base = Path(spec.base)
    if not base.is_absolute() and (sweep_path.parent / base).is_file():
        base = sweep_path.parent / base  # relative to the sweep file first, then to the working folder
    return read_yaml(base), str(base)


def apply_params(values: dict, params: dict) -> dict:
    """Config values with a trial's parameters set (derived keys resolved)."""
    out = dict(values)
    for key, value in params.items():
        if key not in DERIVED_KEYS:
            out[key] = value
    if "lora_alpha_ratio" in params:
        out["lora_alpha"] = float(params["lora_alpha_ratio"]) * int(
            out.get("lora_rank", Config.model_fields["lora_rank"].default)
        )
    return out


def _check_search_space(spec: SweepSpec, base_values: dict, source: str) -> None:
    if not spec.search_space:
        raise LoralabError(f"{source}: `search_space` is empty; expected at least one config key to vary")
    for key, space in spec.search_space.items():
        where = f"{source}: search_space.{key}"
        if key in NOT_SEARCHABLE_KEYS:
            raise LoralabError(f"{where}: `{key}` cannot be swept (the sweep sets it for each trial)")
        if key not in FIELDS and key not in DERIVED_KEYS:
            hint = did_you_mean(key, [*FIELDS, *DERIVED_KEYS])
            raise LoralabError(f"{where}: unknown config key `{key}`{hint} (see `loralab config show --keys`)")
        if isinstance(space, Range):
            if spec.strategy == "grid":
                raise LoralabError(f"{where}: grid needs a list of values, got a range {{low, high}}")
            if space.low > space.high:
                raise LoralabError(f"{where}: low ({space.low}) is above high ({space.high})")
            if space.log and space.low <= 0:
                raise LoralabError(f"{where}: a log range needs low > 0, got {space.low}")
            if key in DERIVED_KEYS:
                values = [space.low, space.high]
            elif _is_int_key(key):
                if space.low != int(space.low) or space.high != int(space.high):
                    raise LoralabError(f"{where}: `{key}` is an integer; expected integer low/high")
                values = [int(space.low), int(space.high)]
            elif Config.model_fields[key].annotation in (float, float | None):
                values = [space.low, space.high]
            else:
                raise LoralabError(f"{where}: `{key}` is not numeric; expected a list of values")
        else:
            if not space:
                raise LoralabError(f"{where}: empty list; expected at least one value")
            for v in space:
                if not (v is None or isinstance(v, (str, int, float, bool))):
                    raise LoralabError(f"{where}: {v!r} is not a plain value (string, number, true/false or null)")
            if len({json.dumps(v) for v in space}) != len(space):
                raise LoralabError(f"{where}: the list has duplicate values")
            values = list(space)
        for v in values:  # every value must make a valid config on its own
            try:
                build_config(apply_params(base_values, {key: v}), source=where)
            except LoralabError as e:
                raise LoralabError(f"{e} (value {v!r})") from None


def _check_recipes(spec: SweepSpec, base_values: dict, source: str) -> None:
    """Each named recipe: a plain folder name, config keys a trial could set, a valid config on top of base."""
    for name, keys in spec.compare_recipes.items():
        where = f"{source}: compare_recipes.{name}"
        if name in (WINNER, BASE_CONFIG) or not name.replace("_", "").replace("-", "").isalnum():
            raise LoralabError(
                f"{where}: expected a plain name of letters, digits, - and _ other than "
                f"`{WINNER}` and `{BASE_CONFIG}` (it names the recipe's folder and table column)"
            )
        if not isinstance(keys, dict) or not keys:
            raise LoralabError(f"{where}: expected config keys, e.g. {{lora_rank: 8, learning_rate: 1.0e-4}}")
        for key, value in keys.items():
            if key not in FIELDS and key not in DERIVED_KEYS:
                hint = did_you_mean(key, [*FIELDS, *DERIVED_KEYS])
                raise LoralabError(f"{where}: unknown config key `{key}`{hint} (see `loralab config show --keys`)")
            if key in NOT_SEARCHABLE_KEYS:
                raise LoralabError(
                    f"{where}: `{key}` cannot be set by a recipe (the sweep sets it, and a recipe is "
                    "tested on the same test records as the winner)"
                )
            if not (value is None or isinstance(value, (str, int, float, bool))):
                raise LoralabError(f"{where}.{key}: {value!r} is not a plain value (string, number, true/false, null)")
        build_config(apply_params(base_values, keys), source=where)


def load_sweep(
    path: str | Path, overrides: list[str] | None = None, budget_overrides: dict | None = None
) -> tuple[SweepSpec, Config, Path]:
    """Read and check a sweep file -> (spec, base config, sweep folder). `overrides` are key=value of the base
    config; `budget_overrides` replace the file's n_trials / timeout_minutes (the command line's --n-trials,
    --timeout-minutes). Bad input: one-line LoralabError."""
    path = Path(path)
    raw = read_yaml(path)
    raw = raw | {k: v for k, v in (budget_overrides or {}).items() if v is not None}
    try:
        spec = SweepSpec(**raw)
    except ValidationError as e:
        raise LoralabError(_spec_error(e, str(path))) from None
    values, base_source = _base_values(spec, path)
    if spec.base_overrides:
        values.update(spec.base_overrides)
        base_source += f" + {path}: base_overrides"
    if overrides:
        values.update(load_config(None, overrides).model_dump(exclude_unset=True))
    base = build_config(values, source=base_source)
    _check_search_space(spec, values, str(path))
    _check_recipes(spec, values, str(path))
    if spec.objective != "eval_loss" and spec.objective not in metrics_mod.METRICS:
        choices = ["eval_loss", *metrics_mod.METRICS]
        hint = did_you_mean(spec.objective, choices)
        raise LoralabError(
            f"{path}: `objective`: unknown {spec.objective!r}{hint} (expected one of {', '.join(choices)})"
        )
    if base.eval_dataset is None and base.val_size <= 0 and not base.data_source:  # data_source makes a val split
        raise LoralabError(
            f"{base_source}: the sweep selects on the validation split; set eval_dataset or val_size > 0"
        )
    if base.eval_strategy == "no" and (spec.objective == "eval_loss" or spec.pruner != "none"):
        raise LoralabError(
            f"{base_source}: eval_strategy is `no`, but the sweep needs the validation loss "
            "(objective eval_loss / pruning); set eval_strategy: steps"
        )
    if spec.strategy == "grid":
        size = grid_size(spec)
        if spec.n_trials is not None and spec.n_trials > size:
            log.info("%s: n_trials %d is more than the %d grid points; running %d", path, spec.n_trials, size, size)
    elif spec.n_trials is None and spec.timeout_minutes is None:
        raise LoralabError(f"{path}: {spec.strategy} needs a budget: set n_trials and/or timeout_minutes")
    out = Path(spec.output_dir or Path("runs") / f"sweep_{path.stem}")
    return spec, base, out


def grid_size(spec: SweepSpec) -> int:
    return math.prod(len(v) for v in spec.search_space.values())


def budget(spec: SweepSpec) -> int | None:
    if spec.strategy == "grid":
        return min(spec.n_trials or grid_size(spec), grid_size(spec))
    return spec.n_trials


def direction(spec: SweepSpec) -> str:
    return spec.direction or ("minimize" if spec.objective == "eval_loss" else "maximize")


def tpe_startup(spec: SweepSpec) -> int:
    """Random trials before TPE takes over (the starting config, enqueued as trial 0, is one of them)."""
    if spec.tpe_startup_trials:
        return spec.tpe_startup_trials
    n = budget(spec)
    return 10 if n is None else min(10, max(3, n // 3))


# --- the study --------------------------------------------------------------------------------------
def open_study(spec: SweepSpec, sweep_dir: Path, storage_url: str | None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # loralab logs each trial (and its error) itself
    storage = make_storage(storage_url, sweep_dir, spec.heartbeat_seconds)
    if spec.strategy == "grid":
        # Same seed in every worker: GridSampler maps trial number -> grid point, so workers agree.
        space = {k: list(v) for k, v in spec.search_space.items()}
        sampler = optuna.samplers.GridSampler(space, seed=spec.seed)
    else:
        # Workers that started together must not draw the same points: mix in the process id.
        seed = spec.seed * 1_000_003 + os.getpid()
        sampler = (
            optuna.samplers.RandomSampler(seed=seed)
            if spec.strategy == "random"
            else optuna.samplers.TPESampler(seed=seed, n_startup_trials=tpe_startup(spec))
        )
    pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=spec.pruner_startup_trials, n_warmup_steps=spec.pruner_warmup_steps
        )
        if spec.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        storage=storage,
        study_name=spec.study_name or sweep_dir.name,
        sampler=sampler,
        pruner=pruner,
        direction=direction(spec),
        load_if_exists=True,
    )


# --- a trial ------------------------------------------------------------------------------------------
def suggest_params(trial, spec: SweepSpec) -> dict:
    """The trial's values of the swept keys, drawn by the study's sampler (a grid point, random, TPE)."""
    params = {}
    for key, space in spec.search_space.items():
        if isinstance(space, Range):
            if key not in DERIVED_KEYS and _is_int_key(key):
                params[key] = trial.suggest_int(
                    key, int(space.low), int(space.high), log=space.log, step=int(space.step or 1)
                )
            else:
                params[key] = trial.suggest_float(key, space.low, space.high, log=space.log, step=space.step)
        else:
            params[key] = trial.suggest_categorical(key, list(space))
    return params


def same_value(a, b) -> bool:
    """Equal config values: numbers up to float rounding, true/false only to themselves."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def base_params(spec: SweepSpec, base: Config) -> dict | None:
    """The base config's values of the swept keys, if every one of them lies in the search space."""
    out = {}
    for key, space in spec.search_space.items():
        value = base.alpha / base.lora_rank if key == "lora_alpha_ratio" else getattr(base, key)
        if isinstance(space, Range):
            if not isinstance(value, (int, float)) or not space.low <= value <= space.high:
                return None
            if space.step and not math.isclose(
                (value - space.low) / space.step, round((value - space.low) / space.step)
            ):
                return None
            out[key] = int(value) if key not in DERIVED_KEYS and _is_int_key(key) else float(value)
        else:
            same = [v for v in space if same_value(v, value)]
            if not same:
                return None
            out[key] = same[0]
    return out


def loss_sign(spec: SweepSpec) -> int:
    """Pruning compares validation losses in the study's direction: a maximized objective (ROUGE)
    gets -loss reported, so that a higher loss still looks worse to the pruner."""
    return 1 if direction(spec) == "minimize" else -1


def _pruning_callback(trial, sign: int):
    """A transformers TrainerCallback: report each validation loss, stop training when Optuna prunes."""
    from transformers import TrainerCallback

    class PruneOnEvalLoss(TrainerCallback):
        pruned_at: int | None = None
        last_loss: float | None = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None:
                return
            self.last_loss = float(loss)
            trial.report(sign * self.last_loss, state.global_step)
            if trial.should_prune():
                self.pruned_at = state.global_step
                control.should_training_stop = True

    return PruneOnEvalLoss()


def validation_score(cfg: Config, run_dir: str, metric: str, n: int) -> float:
    """A generation metric of a trained run on the first n validation records (never the test split).

    The predictions and scores stay in RUN/val_generation/ so the number can be checked."""
    prompts, labels, source = evaluate.load_examples(cfg, "val")
    prompts, labels = prompts[:n], labels[:n]
    source = {**source, "n_samples": len(labels), "subset": f"first {len(labels)} validation records"}
    out = Path(run_dir) / "val_generation"
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(cfg, {"trial": str(run_dir)}, merge=True)
    pred = evaluate.predict_into(engine, cfg, prompts, labels, source, out, "trial", str(run_dir), progress=False)
    result = evaluate.score_into(out, pred["rows"], {**source, "adapter": str(run_dir)}, n_boot=200, seed=cfg.seed)
    return float(result["metrics"][metric]["value"])


TrainFn = Callable[..., dict]


def make_objective(study, spec: SweepSpec, base: Config, sweep_dir: Path, train_fn: TrainFn | None = None):
    def objective(trial) -> float:
        import optuna

        trial.set_user_attr("worker", worker_identity())
        params = suggest_params(trial, spec)
        try:
            check_slot(study, trial, params, budget(spec), grid=spec.strategy == "grid")
        except Skip as e:
            trial.set_user_attr("skipped", str(e))
            log.info("trial %d not run: %s", trial.number, e)
            if str(e).startswith("over budget"):
                study.stop()
            raise
        run_dir = sweep_dir / "trials" / f"trial_{trial.number:03d}"
        trial.set_user_attr("run_dir", str(run_dir))
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in params.items()))
        pruning = _pruning_callback(trial, loss_sign(spec))
        fn = train_fn or train.train
        try:
            cfg = build_config(
                apply_params(base.model_dump(), params) | {"output_dir": str(run_dir)}, source=f"trial {trial.number}"
            )
            summary = fn(cfg, callbacks=[pruning])
            record = {k: summary.get(k) for k in ("best_eval_loss", "best_step", "steps", "tokens_per_s", "runtime_s")}
            trial.set_user_attr("train", record)
            # The run folder says which sweep trial it is (config.yaml already holds every setting).
            write_json(
                run_dir / "sweep_trial.json",
                {
                    "sweep_dir": str(sweep_dir),
                    "trial": trial.number,
                    "params": params,
                    "pruned_at_step": pruning.pruned_at,
                },
            )
            if pruning.pruned_at is not None:
                raise optuna.TrialPruned(f"validation loss {pruning.last_loss:.4f} at step {pruning.pruned_at}")
            if spec.objective == "eval_loss":
                value = summary.get("best_eval_loss")
                if value is None:
                    raise RuntimeError("training reported no validation loss")
            else:
                value = validation_score(
                    cfg, summary.get("run_dir", str(run_dir)), spec.objective, spec.objective_samples
                )
            return float(value)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise
        except Exception as e:  # out of memory, bad combination, ...: record it, the sweep goes on
            error = f"{type(e).__name__}: {e}"[:1000]
            trial.set_user_attr("error", error)
            log.warning("trial %d failed: %s", trial.number, error)
            log.debug("trial %d traceback", trial.number, exc_info=True)
            _free_memory()
            raise

    return objective


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# --- the sweep folder -----------------------------------------------------------------------------------
def _check_same_sweep(sweep_dir: Path, resolved: dict) -> None:
    """A sweep folder belongs to one sweep: same base, search space and strategy."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        return
    old = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key in ("base", "search_space", "strategy", "objective"):
        a, b = old.get(key), resolved.get(key)
        if key == "base" and isinstance(a, dict) and isinstance(b, dict):
            # Settings that change no trial: speed, files, serving, and the final test (e.g. the whole test split
            # instead of test_max_samples, after the trials are done).
            a, b = ({k: v for k, v in d.items() if k not in RESULT_NEUTRAL_KEYS | TEST_KEYS} for d in (a, b))
        if a != b:
            raise LoralabError(
                f"{sweep_dir}: holds a different sweep (its `{key}` differs); "
                "set output_dir to a new folder, or restore the original sweep file"
            )


def _resolved(spec: SweepSpec, base: Config, storage_url: str | None) -> dict:
    space = {k: (v.model_dump() if isinstance(v, Range) else list(v)) for k, v in spec.search_space.items()}
    return {
        "strategy": spec.strategy,
        "objective": spec.objective,
        "direction": direction(spec),
        "n_trials": budget(spec),
        "timeout_minutes": spec.timeout_minutes,
        "search_space": space,
        "storage": redact(storage_url) if storage_url else f"journal file {JOURNAL_FILE}",
        "objective_samples": spec.objective_samples,
        "compare_recipes": spec.compare_recipes,
        "pruner": spec.pruner,
        "seed": spec.seed,
        "tpe_startup_trials": tpe_startup(spec) if spec.strategy == "tpe" else None,
        "base": base.model_dump(mode="json"),
    }


# --- selection and the one test-split evaluation ------------------------------------------------------
def same_as_base(params: dict, base: Config) -> bool:
    """Are a trial's parameters the base config's own values?"""
    return all(
        same_value(value, base.alpha / base.lora_rank if key == "lora_alpha_ratio" else getattr(base, key))
        for key, value in params.items()
    )


def trial_dir(sweep_dir: Path, trial) -> Path:
    """A trial's run folder: SWEEP_DIR/trials/trial_NNN (the recorded path may be relative to another folder)."""
    here = sweep_dir / "trials" / f"trial_{trial.number:03d}"
    return here if here.is_dir() else Path(trial.user_attrs.get("run_dir", here))


def training_settings(cfg: Config) -> dict:
    """What decides the trained model (the train-stage keys, lora_alpha resolved): equal settings, same run."""
    values = {k: v for k, v in cfg.model_dump(mode="json").items() if k in TRAIN_KEYS}
    values["lora_alpha"] = cfg.alpha
    return values


def train_once(cfg: Config, run_dir: Path, what: str) -> None:
    """Train `cfg` as a normal run in our own folder `run_dir`, unless it finished there before; a run cut
    off earlier resumes from its last complete checkpoint."""
    if (run_dir / "train_results.json").is_file():
        return
    resume = run_dir.is_dir() and train.find_resume_checkpoint(run_dir) is not None
    log.info("training %s as a normal run in %s%s", what, run_dir, " (resuming)" if resume else "")
    train.train(
        cfg.model_copy(
            update={
                "output_dir": str(run_dir),
                "overwrite_output_dir": not resume,
                "resume_from_checkpoint": True if resume else None,
            }
        )
    )


def prepare_recipes(spec: SweepSpec, base: Config, sweep_dir: Path, done: list, base_dir: Path) -> dict:
    """Each named recipe trained at the base budget (base + base_overrides + its keys), in
    SWEEP_DIR/recipes/NAME, or a finished trial (or the base run) with the very same training settings
    reused; with its score on the sweep's objective over the same validation records as the trials."""
    recipes = {}
    for name, keys in spec.compare_recipes.items():
        cfg = build_config(apply_params(base.model_dump(), keys), source=f"compare_recipes.{name}")
        same = next(
            (
                t
                for t in done
                if training_settings(build_config(apply_params(base.model_dump(), t.params))) == training_settings(cfg)
            ),
            None,
        )
        if same is not None:
            run_dir, value, reused = trial_dir(sweep_dir, same), same.value, f"trial {same.number}"
            log.info("recipe %s: same training settings as trial %d; reusing its run", name, same.number)
        else:
            reused = "base config" if training_settings(cfg) == training_settings(base) else None
            run_dir = base_dir if reused else sweep_dir / "recipes" / name
            train_once(cfg, run_dir, f"recipe {name}")
            summary = json.loads((run_dir / "train_results.json").read_text(encoding="utf-8"))
            if spec.objective == "eval_loss":
                value = summary.get("best_eval_loss")
            else:
                value = validation_score(cfg, str(run_dir), spec.objective, spec.objective_samples)
        recipes[name] = {"keys": keys, "run": str(run_dir), "reused": reused, "validation": value}
    return recipes


def finalize(study, spec: SweepSpec, base: Config, sweep_dir: Path) -> dict:
    """Pick the best trial on validation, then evaluate it, the base config and the named recipes once on
    the test split, each against the winner sample by sample."""
    from optuna.trial import TrialState

    done = [t for t in counted_trials(study.get_trials(deepcopy=False)) if t.state == TrialState.COMPLETE]
    if not done:
        raise LoralabError(f"{sweep_dir}: no trial finished (see leaderboard.md for errors); nothing to select")
    best = study.best_trial
    tuned_dir = trial_dir(sweep_dir, best)
    if not tuned_dir.is_dir():
        host = (best.user_attrs.get("worker") or {}).get("host")
        raise LoralabError(
            f"{tuned_dir}: the best trial {best.number} ran on {host}; its run folder is not here. "
            "Copy it (same path) or run this command on that machine"
        )

    # The starting point as a normal run: reuse a trial with the base values, else train it once.
    as_base = [t for t in done if same_as_base(t.params, base)]
    base_trial = best if best in as_base else next(iter(as_base), None)
    winner_is_base = base_trial is not None and base_trial.number == best.number
    if base_trial is not None:
        base_dir = trial_dir(sweep_dir, base_trial)
    else:
        base_dir = sweep_dir / "base_run"
        train_once(base, base_dir, "the base config")
    recipes = prepare_recipes(spec, base, sweep_dir, done, base_dir)
    test_settings = {k: getattr(base, k) for k in sorted(TEST_KEYS)}
    result = {
        "objective": spec.objective,
        "direction": direction(spec),
        "selected_on": "validation split",
        "best_trial": best.number,
        "best_value": best.value,
        "best_params": best.params,
        "tuned_run": str(tuned_dir),
        "base_run": str(base_dir),
        "base_is_trial": base_trial.number if base_trial is not None else None,
        "winner_is_base": winner_is_base,
        "recipes": recipes,
        "test_settings": test_settings,
    }
    # Every model on one loaded base model, the same test prompts and the base config's generation
    # settings; each one against the winner (b - a = winner - other). The starting config that won is
    # tested once, as the winner.
    models = {} if winner_is_base else {BASE_CONFIG: str(base_dir)}
    models |= {WINNER: str(tuned_dir)} | {name: r["run"] for name, r in recipes.items()}
    pairs = [(name, WINNER) for name in models if name != WINNER]
    results_path = sweep_dir / RESULTS_FILE
    old = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
    test_dir = sweep_dir / "test_eval"
    tested = (
        json.loads((test_dir / evaluate.COMPARISON).read_text(encoding="utf-8"))
        if (test_dir / evaluate.COMPARISON).is_file()
        else None
    )
    if (
        tested
        and old.get("best_trial") == best.number
        and set(tested["models"]) == set(models)
        and {n: r["keys"] for n, r in (old.get("recipes") or {}).items()} == spec.compare_recipes
        and old.get("test_settings", test_settings) == test_settings
    ):  # (files from before it was recorded)
        summary = tested  # tested once already
    else:
        log.info("evaluating %s on the test split", ", ".join(f"{n} ({p})" for n, p in models.items()))
        summary = evaluate.evaluate_models(
            base, models, split="test", out_dir=test_dir, overwrite=True, progress=False, pairs=pairs
        )
    result["test"] = {
        "dir": str(test_dir),
        "n_samples": summary.get("n_samples"),
        "capped_by": summary.get("capped_by"),
        "models": {k: v["metrics"] for k, v in summary["models"].items()},
        "comparison": summary["comparisons"].get(f"{WINNER}_vs_{BASE_CONFIG}"),
        "recipe_comparisons": {name: summary["comparisons"].get(f"{WINNER}_vs_{name}") for name in recipes},
    }
    result["table"] = evaluate.format_comparison_table(summary)
    write_json(results_path, result)
    return result


# --- the recipe -------------------------------------------------------------------------------------
def run_sweep(
    path: str | Path,
    overrides: list[str] | None = None,
    storage: str | None = None,
    trials_only: bool = False,
    train_fn: TrainFn | None = None,
    finalize_fn=None,
    n_trials: int | None = None,
    timeout_minutes: float | None = None,
) -> dict:
    """`loralab sweep`: run trials until the budget is spent, then (unless trials_only) select and test.
    n_trials / timeout_minutes, when given, replace the sweep file's budget (a folder's sweep may grow)."""
    from optuna.trial import TrialState

    spec, base, sweep_dir = load_sweep(path, overrides, {"n_trials": n_trials, "timeout_minutes": timeout_minutes})
    base = data.with_prepared_data(base)
    storage_url = storage or spec.storage
    resolved = _resolved(spec, base, storage_url)
    _check_same_sweep(sweep_dir, resolved)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True), encoding="utf-8")

    study = open_study(spec, sweep_dir, storage_url)
    if "search_keys" not in study.user_attrs:
        study.set_user_attr("search_keys", list(spec.search_space))
    if spec.start_with_base and spec.strategy != "grid" and not study.get_trials(deepcopy=False):
        start = base_params(spec, base)
        if start is not None:  # the starting point is trial 0: a baseline for the sampler and for the test
            study.enqueue_trial(start, user_attrs={"base_config": True})
    recover_dead_trials(study)
    limit = budget(spec)

    def stop_when_spent(study, trial) -> None:
        recover_dead_trials(study)
        write_leaderboard(study, sweep_dir, spec.objective, direction(spec), list(spec.search_space))
        if limit is not None and len(counted_trials(study.get_trials(deepcopy=False))) >= limit:
            study.stop()

    trials = study.get_trials(deepcopy=False)
    if (
        limit is None
        or len(counted_trials(trials)) < limit
        or any(t.state == TrialState.WAITING for t in counted_trials(trials))
    ):
        log.info(
            "sweep %s: %s, %s trials, objective %s (%s)",
            sweep_dir,
            spec.strategy,
            limit if limit is not None else "until timeout",
            spec.objective,
            direction(spec),
        )
        study.optimize(
            make_objective(study, spec, base, sweep_dir, train_fn),
            n_trials=None,
            timeout=spec.timeout_minutes * 60 if spec.timeout_minutes else None,
            catch=(Exception,),
            callbacks=[stop_when_spent],
            gc_after_trial=True,
        )
    rows = write_leaderboard(study, sweep_dir, spec.objective, direction(spec), list(spec.search_space))
    print(leaderboard_table(rows, spec.objective, list(spec.search_space)))
    result = {"sweep_dir": str(sweep_dir), "leaderboard": rows}
    if trials_only:
        return result
    active = [
        t.number
        for t in counted_trials(study.get_trials(deepcopy=False))
        if t.state in (TrialState.RUNNING, TrialState.WAITING)
    ]
    if active:
        log.warning(
            "trials %s are still running in other workers; run this command again when they finish "
            "to select the winner and test it",
            active,
        )
        return result
    # Workers on this machine that finish together take turns; the second finds the results made.
    with _locked(sweep_dir / ".finalize.lock"):
        result["final"] = (finalize_fn or finalize)(study, spec, base, sweep_dir)
    return result


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
