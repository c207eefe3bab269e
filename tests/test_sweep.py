"""Sweeps: the sweep file's checks, Optuna plumbing (pruning, failures, budget, resume), and on the
tiny model: a full sweep with selection on validation and one test evaluation, a killed worker
resumed, and two concurrent workers on a journal file and on a real PostgreSQL server."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from loralab import sweep, sweep_workers
from loralab.errors import LoralabError


# --- the sweep file ----------------------------------------------------------------------------------
def write_sweep(folder: Path, **spec) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


BASE = {"max_steps": 3, "lora_rank": 8, "eval_dataset": "alpaca_data_val"}


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            {"search_space": {"lora_rnak": [4, 8]}},
            "search_space.lora_rnak: unknown config key `lora_rnak`; did you mean `lora_rank`?",
        ),
        ({"search_space": {"lora_rank": [0, 8]}}, "search_space.lora_rank"),
        ({"search_space": {"learning_rate": {"low": 1e-5, "high": 1e-3}}}, "grid needs a list of values"),
        ({"search_space": {"lora_rank": [4]}, "stratgy": "tpe"}, "unknown key `stratgy`; did you mean `strategy`?"),
        ({"search_space": {"lora_rank": [4]}, "objective": "rougel"}, "did you mean `rougeL`?"),
        ({"search_space": {"output_dir": ["a", "b"]}}, "cannot be swept"),
        ({"search_space": {"test_dataset": ["a"]}}, "cannot be swept"),
        (
            {"search_space": {"lora_rank": {"low": 2.5, "high": 8}}, "strategy": "random", "n_trials": 2},
            "expected integer low/high",
        ),
        ({"search_space": {"lora_rank": [4]}, "strategy": "tpe"}, "needs a budget"),
        ({"search_space": {"lora_rank": [4]}, "strategy": "grids"}, "`strategy`"),
        (
            {"search_space": {"lora_rank": [4]}, "compare_recipes": {"lf": {"lora_rnak": 8}}},
            "compare_recipes.lf: unknown config key `lora_rnak`; did you mean `lora_rank`?",
        ),
        ({"search_space": {"lora_rank": [4]}, "compare_recipes": {"tuned": {"lora_rank": 8}}}, "other than `tuned`"),
        ({"search_space": {"lora_rank": [4]}, "compare_recipes": {"lf": {"test_max_samples": 5}}}, "cannot be set by"),
        ({"search_space": {"lora_rank": [4]}, "compare_recipes": {"lf": {"lora_rank": -1}}}, "compare_recipes.lf"),
    ],
)
def test_sweep_file_errors_name_the_key(tmp_path, spec, message):
    path = write_sweep(tmp_path, base=BASE, **({"strategy": "grid"} | spec))
    with pytest.raises(LoralabError) as e:
        sweep.load_sweep(path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sweep_file_base_needs_validation_data(tmp_path):
    path = write_sweep(tmp_path, base={"eval_dataset": None}, strategy="grid", search_space={"lora_rank": [4]})
    with pytest.raises(LoralabError, match="selects on the validation split"):
        sweep.load_sweep(path)


def test_sweep_file_base_path_and_ranges(tmp_path):
    (tmp_path / "base.yaml").write_text("lora_rank: 16\nlearning_rate: 2.0e-4\neval_dataset: alpaca_data_val\n")
    path = write_sweep(
        tmp_path,
        base="base.yaml",
        strategy="tpe",
        n_trials=3,
        search_space={
            "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True},
            "lora_alpha_ratio": [1, 2],
            "lora_target": ["all", "q_proj,v_proj"],
        },
    )
    spec, base, out = sweep.load_sweep(path, ["seed=7"])
    assert base.lora_rank == 16 and base.seed == 7 and out == Path("runs/sweep_sweep")
    assert sweep.direction(spec) == "minimize" and sweep.budget(spec) == 3
    assert sweep.apply_params(base.model_dump(), {"lora_alpha_ratio": 2})["lora_alpha"] == 32


# --- Optuna plumbing with a stand-in for training -----------------------------------------------------
class FakeTrain:
    """Stands in for train.train: a loss curve that depends on the parameters, validation callbacks,
    and an out-of-memory crash for one configuration. Counts what it ran."""

    def __init__(self):
        self.ran = []

    def __call__(self, cfg, callbacks=None):
        self.ran.append((cfg.lora_rank, cfg.learning_rate))
        if cfg.lora_rank == 16 and cfg.learning_rate > 5e-4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        Path(cfg.output_dir).mkdir(parents=True)
        control = SimpleNamespace(should_training_stop=False)
        losses = []
        for step in (1, 2, 3, 4):
            losses.append(8 / cfg.lora_rank + 1000 * cfg.learning_rate + 1 / step)
            for cb in callbacks or []:
                cb.on_evaluate(None, SimpleNamespace(global_step=step), control, metrics={"eval_loss": losses[-1]})
            if control.should_training_stop:
                break
        return {
            "run_dir": cfg.output_dir,
            "best_eval_loss": min(losses),
            "best_step": step,
            "steps": step,
            "tokens_per_s": 100.0,
            "runtime_s": 0.5,
        }


def study_of(sweep_file):
    spec, _, sweep_dir = sweep.load_sweep(sweep_file)
    return sweep.open_study(spec, sweep_dir, spec.storage)


def test_grid_prunes_records_failures_and_resumes(tmp_path):
    path = write_sweep(
        tmp_path,
        base=BASE,
        strategy="grid",
        output_dir=str(tmp_path / "sw"),
        search_space={"lora_rank": [4, 16], "learning_rate": [1e-3, 1e-4]},
        pruner_startup_trials=1,
    )
    fake = FakeTrain()
    result = sweep.run_sweep(path, trials_only=True, train_fn=fake)
    rows = result["leaderboard"]
    assert sorted(fake.ran) == [(4, 1e-4), (4, 1e-3), (16, 1e-4), (16, 1e-3)]  # each grid point once
    states = {(r["lora_rank"], r["learning_rate"]): r["state"] for r in rows}
    assert states[(16, 1e-3)] == "fail"
    failed = next(r for r in rows if r["state"] == "fail")
    assert "out of memory" in failed["error"]
    assert states[(16, 1e-4)] == "complete" and rows[0]["rank"] == 1
    assert "pruned" in states.values()  # worse than the median at the same step
    for name in ("leaderboard.csv", "leaderboard.md", "trials.json", "importance.json", "sweep.yaml"):
        assert (tmp_path / "sw" / name).is_file()
    assert (
        "| rank | trial | state | val_eval_loss | lora_rank | learning_rate |"
        in (tmp_path / "sw" / "leaderboard.md").read_text()
    )

    # The same command again: nothing is re-run.
    again = FakeTrain()
    sweep.run_sweep(path, trials_only=True, train_fn=again)
    assert again.ran == []
    # A different sweep in the same folder is refused.
    changed = write_sweep(
        tmp_path, base=BASE, strategy="grid", output_dir=str(tmp_path / "sw"), search_space={"lora_rank": [4, 32]}
    )
    with pytest.raises(LoralabError, match="holds a different sweep"):
        sweep.run_sweep(changed, trials_only=True, train_fn=again)


def test_random_budget_and_dead_worker_requeued(tmp_path):
    path = write_sweep(
        tmp_path,
        base=BASE,
        strategy="random",
        n_trials=3,
        output_dir=str(tmp_path / "sw"),
        pruner="none",
        search_space={"lora_rank": [4, 8], "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}},
    )
    spec, _, sweep_dir = sweep.load_sweep(path)
    sweep_dir.mkdir(parents=True)
    study = sweep.open_study(spec, sweep_dir, None)
    study.set_user_attr("search_keys", list(spec.search_space))
    # A worker that died mid-trial: RUNNING, its process gone.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trial = study.ask()
    params = sweep.suggest_params(trial, spec)
    trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": dead.pid, "started": 0.0})

    fake = FakeTrain()
    sweep.run_sweep(path, trials_only=True, train_fn=fake)
    trials = study_of(path).get_trials()
    assert trials[0].state.name == "FAIL" and "died" in trials[0].user_attrs["error"]
    retry = [t for t in trials if sweep_workers.retry_of(t) == 0]
    assert len(retry) == 1 and retry[0].params == params and retry[0].state.name == "COMPLETE"
    counted = sweep_workers.counted_trials(trials)
    assert len(counted) == 3 and all(t.state.name == "COMPLETE" for t in counted) and len(fake.ran) == 3


def test_command_line_budget_replaces_the_files_and_grows_a_sweep(tmp_path, monkeypatch):
    """--n-trials / --timeout-minutes: fit a sweep to the time at hand, or add trials to a finished one."""
    from typer.testing import CliRunner

    from loralab.cli import app

    path = write_sweep(
        tmp_path,
        base=BASE,
        strategy="random",
        n_trials=5,
        output_dir=str(tmp_path / "sw"),
        pruner="none",
        search_space={"lora_rank": [4, 8, 16], "learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}},
    )
    fake = FakeTrain()
    sweep.run_sweep(path, trials_only=True, train_fn=fake, n_trials=2)
    assert len(fake.ran) == 2
    sweep.run_sweep(path, trials_only=True, train_fn=fake, n_trials=3)  # the same folder, a bigger budget
    assert len(fake.ran) == 3 and len(study_of(path).get_trials()) == 3
    spec, _, _ = sweep.load_sweep(path, budget_overrides={"n_trials": None, "timeout_minutes": 30})
    assert (spec.n_trials, spec.timeout_minutes) == (5, 30)  # unset keeps the file's value

    seen = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **kw: seen.update(kw) or {"final": None})
    result = CliRunner().invoke(app, ["sweep", str(path), "--n-trials", "7", "--timeout-minutes", "45"])
    assert result.exit_code == 0, result.output
    assert (seen["n_trials"], seen["timeout_minutes"]) == (7, 45.0)
    refused = CliRunner().invoke(app, ["sweep", str(path), "--n-trials", "0"])
    assert refused.exit_code == 2 and "--n-trials" in refused.output


@pytest.mark.parametrize("n_trials, startup, expected", [(8, None, 3), (30, None, 10), (12, None, 4), (8, 5, 5)])
def test_tpe_models_the_results_after_a_few_random_trials(tmp_path, n_trials, startup, expected):
    """Optuna's TPE default (10 random trials first) would make a small sweep a random search."""
    path = write_sweep(
        tmp_path,
        base=BASE,
        strategy="tpe",
        n_trials=n_trials,
        tpe_startup_trials=startup,
        output_dir=str(tmp_path / "sw"),
        search_space={"lora_rank": [4, 8, 16]},
    )
    spec, _, sweep_dir = sweep.load_sweep(path)
    assert sweep.tpe_startup(spec) == expected
    sweep_dir.mkdir(parents=True)
    assert sweep.open_study(spec, sweep_dir, None).sampler._n_startup_trials == expected


# --- on the tiny model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from loralab import data

    folder = tmp_path_factory.mktemp("sweep-data")
    data.prepare("builtin:demo", output_dir=folder, sample=48, split="32,8,8", name="alpaca_data")
    return folder


def tiny_base(tiny_model, demo_data, **extra) -> dict:
    return {
        "model_name_or_path": str(tiny_model),
        "dataset_dir": str(demo_data),
        "eval_dataset": "alpaca_data_val",
        "max_steps": 2,
        "eval_steps": 1,
        "logging_steps": 1,
        "per_device_train_batch_size": 8,
        "cutoff_len": 96,
        "max_new_tokens": 8,
        "lora_rank": 4,
        "learning_rate": 1e-3,
        "torch_threads": 1,
        **extra,
    }


def test_sweep_selects_on_validation_then_tests_once(tmp_path, tiny_model, demo_data, monkeypatch, artifacts_dir):
    """TPE on the tiny model with a generation objective: test split read only after selection; report renders."""
    from loralab import data, report

    reads = []
    real_load = data.load_conversations
    monkeypatch.setattr(data, "load_conversations", lambda cfg, which: reads.append(which) or real_load(cfg, which))
    path = write_sweep(
        tmp_path,
        base=tiny_base(tiny_model, demo_data, lora_rank=8),
        strategy="tpe",
        n_trials=2,
        objective="rougeL",
        objective_samples=4,
        output_dir=str(tmp_path / "sw"),
        search_space={"lora_rank": [2, 4], "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}},
    )
    result = sweep.run_sweep(path)
    final = result["final"]
    sweep_dir = tmp_path / "sw"
    assert "test" in reads and reads.index("test") > max(i for i, w in enumerate(reads) if w in ("train", "eval"))
    assert final["selected_on"] == "validation split" and final["direction"] == "maximize"
    assert final["base_is_trial"] is None  # lora_rank 8 is not in the space: the base config was trained as a run
    assert (sweep_dir / "base_run" / "train_results.json").is_file()
    for trial_dir in (sweep_dir / "trials").iterdir():
        assert (trial_dir / "val_generation" / "metrics.json").is_file()  # the objective, from 4 val records
    comparison = json.loads((sweep_dir / "test_eval" / "comparison.json").read_text())
    assert set(comparison["models"]) == {"base_config", "tuned"} and comparison["split"] == "test"
    assert "p_value" in final["test"]["comparison"]["metrics"]["rougeL"]
    results = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert results["best_trial"] == final["best_trial"]

    # Resuming a finished sweep neither trains nor reads the test split again.
    reads.clear()
    sweep.run_sweep(path)
    assert "test" not in reads and "train" not in reads

    page = report.write_report(sweep_dir)
    text = page.read_text()
    assert f"Winner: trial {final['best_trial']}" in text and "Leaderboard" in text and "base_config" in text
    md = (sweep_dir / "report.md").read_text()
    assert "report_files/losses.png" in md and (sweep_dir / "report_files" / "losses.png").is_file()
    from test_report import check_in_browser

    check_in_browser(page, artifacts_dir / "sweep_report.png")


def _worker_cmd(sweep_file, storage=None) -> list[str]:
    cmd = [sys.executable, "-m", "loralab.cli", "sweep", str(sweep_file), "--trials-only"]
    return cmd + (["--storage", storage] if storage else [])


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def _run_workers(cmd, n=2, timeout=150) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(n)
    ]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(subprocess.CompletedProcess(cmd, p.returncode, out))
    return outs


def check_no_trial_lost_or_doubled(study, grid: set) -> list:
    trials = study.get_trials()
    counted = sweep_workers.counted_trials(trials)
    assert all(t.state.name == "COMPLETE" for t in counted), [
        (t.number, t.state.name, t.user_attrs.get("error")) for t in counted
    ]
    points = [tuple(sorted(t.params.items())) for t in counted]
    assert len(points) == len(set(points)) and set(points) == grid  # every grid point exactly once
    trained = [
        d for d in Path(counted[0].user_attrs["run_dir"]).parent.iterdir() if (d / "train_results.json").is_file()
    ]
    assert len(trained) == len(counted)  # no skipped or extra trial trained anything
    return counted


GRID = {"lora_rank": [2, 4], "learning_rate": [1e-3, 3e-4]}
GRID_POINTS = {
    tuple(sorted({"lora_rank": r, "learning_rate": lr}.items()))
    for r in GRID["lora_rank"]
    for lr in GRID["learning_rate"]
}


def test_killed_worker_then_two_workers_resume_on_journal_file(tmp_path, tiny_model, demo_data):
    """SIGKILL a worker in the middle of a trial; two workers resume together on the default journal storage."""
    path = write_sweep(
        tmp_path,
        base=tiny_base(tiny_model, demo_data),
        strategy="grid",
        output_dir=str(tmp_path / "sw"),
        search_space=GRID,
        pruner="none",
    )
    victim = subprocess.Popen(_worker_cmd(path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trial_dir = tmp_path / "sw" / "trials" / "trial_000"
    deadline = time.time() + 90
    while not trial_dir.is_dir() and time.time() < deadline and victim.poll() is None:
        time.sleep(0.2)
    assert trial_dir.is_dir(), "the worker never started a trial"
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    outs = _run_workers(_worker_cmd(path))
    assert all(o.returncode == 0 for o in outs), outs[0].stdout[-2000:] + outs[1].stdout[-2000:]
    study = study_of(path)
    trials = study.get_trials()
    killed = trials[0]
    assert killed.state.name == "FAIL" and "died" in killed.user_attrs["error"]
    assert [t.params for t in trials if sweep_workers.retry_of(t) == 0] == [killed.params]
    check_no_trial_lost_or_doubled(study, GRID_POINTS)


# --- PostgreSQL ----------------------------------------------------------------------------------------
def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (initdb + pg_ctl, as user postgres when we are root)."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed (pip install -e '.[test]')")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="loralab-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as another user")
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()
    try:
        subprocess.run(
            [*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-w",
                "-t",
                "60",
                "-l",
                str(folder / "log"),
                "-o",
                f"-h 127.0.0.1 -p {port} -k {folder}",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE loralab_sweep")
        conn.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/loralab_sweep"  # the URL a user types
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_a_postgres_sweep(tmp_path, tiny_model, demo_data, postgres_url):
    path = write_sweep(
        tmp_path,
        base=tiny_base(tiny_model, demo_data),
        strategy="grid",
        output_dir=str(tmp_path / "sw"),
        search_space=GRID,
        pruner="none",
    )
    outs = _run_workers(_worker_cmd(path, postgres_url))
    assert all(o.returncode == 0 for o in outs), outs[0].stdout[-2000:] + outs[1].stdout[-2000:]
    spec, _, sweep_dir = sweep.load_sweep(path)
    study = sweep.open_study(spec, sweep_dir, postgres_url)
    counted = check_no_trial_lost_or_doubled(study, GRID_POINTS)
    workers = {t.user_attrs["worker"]["pid"] for t in counted}
    assert len(workers) == 2, "both workers should have run trials"
    assert not (sweep_dir / sweep_workers.JOURNAL_FILE).exists()  # the shared database, not the local file
    assert "***" not in postgres_url and "postgres@127.0.0.1" in (sweep_dir / "sweep.yaml").read_text()


def test_base_config_is_the_first_trial_when_it_lies_in_the_space(tmp_path):
    path = write_sweep(
        tmp_path,
        base={**BASE, "learning_rate": 1e-3, "lora_alpha": 16},
        strategy="tpe",
        n_trials=3,
        output_dir=str(tmp_path / "sw"),
        pruner="none",
        search_space={
            "lora_rank": [4, 8],
            "lora_alpha_ratio": [1, 2],
            "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
        },
    )
    spec, base, _ = sweep.load_sweep(path)
    assert sweep.base_params(spec, base) == {"lora_rank": 8, "lora_alpha_ratio": 2, "learning_rate": 1e-3}
    fake = FakeTrain()
    rows = sweep.run_sweep(path, trials_only=True, train_fn=fake)["leaderboard"]
    assert fake.ran[0] == (8, 1e-3) and len(fake.ran) == 3
    assert next(r for r in rows if r["trial"] == 0)["note"] == "base config"
    trial0 = study_of(path).get_trials()[0]
    assert sweep.same_as_base(trial0.params, base)
    # outside the space (rank 16): no base trial; the base config is trained as its own run at the end
    spec16 = spec.model_copy(update={"search_space": {"lora_rank": [4, 8]}})
    assert sweep.base_params(spec16, base.model_copy(update={"lora_rank": 16})) is None


def test_data_source_prepared_once_and_checked(tmp_path):
    """A base config with data_source gets its splits prepared (as `loralab run` does); other settings are refused."""
    from loralab.config import build_config
    from loralab.data import with_prepared_data

    cfg = build_config(
        {
            "data_source": "builtin:demo",
            "data_sample": 50,
            "data_split": "30,10,10",
            "dataset_dir": str(tmp_path / "data"),
            "data_name": "demo",
        }
    )
    prepared = with_prepared_data(cfg)
    assert (prepared.dataset, prepared.eval_dataset, prepared.test_dataset) == ("demo_train", "demo_val", "demo_test")
    assert (tmp_path / "data" / "demo_val.json").is_file()
    with_prepared_data(cfg)  # the same settings: reused
    with pytest.raises(LoralabError, match="holds splits prepared with other settings.*split="):
        with_prepared_data(cfg.model_copy(update={"data_split": "20,20,10"}))


def test_pruning_follows_the_objective_direction(tmp_path, monkeypatch):
    """With a maximized generation objective, the pruner still stops the trials with the higher loss."""
    path = write_sweep(
        tmp_path,
        base=BASE,
        strategy="grid",
        output_dir=str(tmp_path / "sw"),
        objective="rougeL",
        search_space={"lora_rank": [16, 4], "learning_rate": [1e-4]},
        pruner_startup_trials=1,
        seed=1,
    )  # with Optuna 5's grid shuffle, seed 1 runs rank 16 first
    monkeypatch.setattr(sweep, "validation_score", lambda cfg, *a: 50.0 if cfg.lora_rank == 16 else 40.0)
    rows = sweep.run_sweep(path, trials_only=True, train_fn=FakeTrain())["leaderboard"]
    by_rank = {r["lora_rank"]: r for r in rows}
    # rank 16 has the lower validation loss (8/16 + ...): never pruned; rank 4 is pruned when it runs second
    assert by_rank[16]["state"] == "complete" and by_rank[16]["rougeL"] == 50.0
    if by_rank[16]["trial"] == 0:
        assert by_rank[4]["state"] == "pruned" and by_rank[4]["best_eval_loss"] > by_rank[16]["best_eval_loss"]
    else:
        assert by_rank[4]["state"] == "complete"


def test_winner_is_the_base_config(tmp_path, tiny_model, demo_data):
    """When the starting config wins, it is tested once, alone, and the report says so."""
    from loralab import report

    path = write_sweep(
        tmp_path,
        base=tiny_base(tiny_model, demo_data, lora_rank=4),
        strategy="grid",
        output_dir=str(tmp_path / "sw"),
        search_space={"lora_rank": [4]},
        pruner="none",
    )
    final = sweep.run_sweep(path)["final"]
    assert final["winner_is_base"] and final["base_is_trial"] == 0 and final["test"]["comparison"] is None
    assert set(json.loads((tmp_path / "sw" / "test_eval" / "comparison.json").read_text())["models"]) == {"tuned"}
    assert not (tmp_path / "sw" / "base_run").exists()
    assert "The starting config itself was the best trial" in report.write_report(tmp_path / "sw").read_text()


def test_named_recipes_are_trained_at_the_base_budget_and_tested_against_the_winner(tmp_path, tiny_model, demo_data):
    """compare_recipes: a recipe is trained on top of base + base_overrides (or a trial with the same training
    settings is reused) and tested on the same test records as the winner and the base config."""
    from loralab import report

    lf = {
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_target": "all",
        "learning_rate": 1.0e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
    }
    path = write_sweep(
        tmp_path,
        base=tiny_base(tiny_model, demo_data, lora_rank=4, test_max_samples=5),
        base_overrides={"max_steps": 3},
        strategy="grid",
        output_dir=str(tmp_path / "sw"),
        search_space={"lora_rank": [2]},
        pruner="none",
        compare_recipes={"lf_example": lf, "rank2": {"lora_rank": 2}},
    )
    final = sweep.run_sweep(path)["final"]
    sweep_dir = tmp_path / "sw"
    recipe_run = sweep_dir / "recipes" / "lf_example"
    trained = yaml.safe_load((recipe_run / "config.yaml").read_text())
    assert {k: trained[k] for k in lf} == lf and trained["max_steps"] == 3  # the recipe at the base budget
    assert json.loads((recipe_run / "train_results.json").read_text())["steps"] == 3
    assert final["recipes"]["rank2"]["reused"] == "trial 0" and not (sweep_dir / "recipes" / "rank2").exists()
    assert final["recipes"]["lf_example"]["reused"] is None and final["recipes"]["lf_example"]["validation"] > 0

    comparison = json.loads((sweep_dir / "test_eval" / "comparison.json").read_text())
    assert set(comparison["models"]) == {"base_config", "tuned", "lf_example", "rank2"}
    assert comparison["n_samples"] == 5 and comparison["capped_by"] == {"test_max_samples": 5}
    comps = comparison["comparisons"]
    assert set(comps) == {"tuned_vs_base_config", "tuned_vs_lf_example", "tuned_vs_rank2"}
    assert (comps["tuned_vs_lf_example"]["a"], comps["tuned_vs_lf_example"]["b"]) == ("lf_example", "tuned")
    # rank2 is the winner's own run: the same predictions, a difference of exactly 0
    assert all(m["delta"] == 0 for m in comps["tuned_vs_rank2"]["metrics"].values())
    results = json.loads((sweep_dir / "sweep_results.json").read_text())
    assert results["test"]["recipe_comparisons"]["lf_example"]["metrics"]["rougeL"]["p_value"] is not None
    assert "lf_example" in final["table"] and "tuned_vs_base_config" not in final["table"]
    text = report.write_report(sweep_dir).read_text()
    assert "Named recipes" in text and "lf_example" in text and "winner - recipe" in text

    # Run again: nothing is trained or tested twice.
    mtime = (sweep_dir / "test_eval" / "comparison.json").stat().st_mtime_ns
    trained_at = (recipe_run / "train_results.json").stat().st_mtime_ns
    sweep.run_sweep(path)
    assert (sweep_dir / "test_eval" / "comparison.json").stat().st_mtime_ns == mtime
    # The whole test split afterwards: the same trials and runs, only the test evaluation again.
    whole = sweep.run_sweep(path, ["test_max_samples=null"])["final"]
    assert whole["test"]["n_samples"] == 8 and whole["test"]["capped_by"] is None
    assert (recipe_run / "train_results.json").stat().st_mtime_ns == trained_at
