"""Several workers on one study (sweep_workers): dead-worker recovery, retries through Optuna's retry
callback, the exact budget and duplicate checks. On a journal file, without training anything."""

import socket
import subprocess
import sys

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from loralab import sweep_workers
from loralab.sweep_workers import Skip, check_slot, counted_trials, recover_dead_trials, retry, retry_of

SPACE = {"lora_rank": CategoricalDistribution([4, 8])}


@pytest.fixture
def study(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = sweep_workers.make_storage(None, tmp_path)
    study = optuna.create_study(storage=storage, study_name="s")
    study.set_user_attr("search_keys", ["lora_rank"])
    return study


def dead_worker() -> dict:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return {"host": socket.gethostname(), "pid": proc.pid, "started": 0.0}


def test_dead_worker_trial_is_failed_and_queued_again_clean(study):
    assert sweep_workers.worker_alive(sweep_workers.worker_identity())
    dead = dead_worker()
    assert not sweep_workers.worker_alive(dead)
    trial = study.ask({"lora_rank": SPACE["lora_rank"]})
    for key, value in {"worker": dead, "run_dir": "trials/trial_000", "base_config": True}.items():
        trial.set_user_attr(key, value)
    recover_dead_trials(study)
    old, copy = study.get_trials()
    assert old.state == TrialState.FAIL and "died while running it" in old.user_attrs["error"]
    assert copy.state == TrialState.WAITING and copy.params == old.params and retry_of(copy) == old.number
    # The copy keeps only the base-config mark: not the dead worker, its folder or the error.
    assert copy.user_attrs == {"base_config": True}
    assert counted_trials(study.get_trials()) == [copy]
    recover_dead_trials(study)  # nothing more to recover: no second copy
    assert len(study.get_trials()) == 2


def test_retry_of_a_retry_and_older_sweeps(study):
    first = study.ask({"lora_rank": SPACE["lora_rank"]})
    study.tell(first, state=TrialState.FAIL)
    retry(study, study.get_trials()[0])
    second = study.ask()  # pops the queued copy
    study.tell(second, state=TrialState.FAIL)
    retry(study, study.get_trials()[1])
    trials = study.get_trials()
    assert [retry_of(t) for t in trials] == [None, 0, 1]
    assert [t.number for t in counted_trials(trials)] == [2]
    assert trials[2].params == trials[0].params
    # Sweeps made before loralab used Optuna's retry callback marked the copy with a user attribute.
    legacy = optuna.trial.create_trial(state=TrialState.WAITING, user_attrs={"retry_of": 2})
    assert retry_of(legacy) == 2


def test_a_trial_without_its_parameters_is_not_queued_again(study):
    trial = study.ask()  # died before suggesting anything
    study.tell(trial, state=TrialState.FAIL)
    retry(study, study.get_trials()[0])
    assert len(study.get_trials()) == 1


def test_budget_and_duplicates_smaller_number_wins(study):
    trials = [study.ask({"lora_rank": SPACE["lora_rank"]}) for _ in range(3)]
    params = {"lora_rank": study.get_trials()[2].params["lora_rank"]}
    check_slot(study, trials[2], params, limit=3, grid=False)
    with pytest.raises(Skip, match="over budget: 2 trials"):
        check_slot(study, trials[2], params, limit=2, grid=False)
    # Grid: a point an earlier trial already has is not trained twice.
    earlier = study.get_trials()[0].params
    with pytest.raises(Skip, match="duplicate grid point \\(trial 0"):
        check_slot(study, trials[2], earlier, limit=None, grid=True)
    # Two workers queued the base-config trial at once: the smaller number runs it.
    for _ in range(2):
        study.enqueue_trial({"lora_rank": 4}, user_attrs={"base_config": True})
    first, second = study.ask(), study.ask()
    check_slot(study, first, {"lora_rank": 4}, limit=None, grid=False)
    with pytest.raises(Skip, match=f"duplicate base-config trial \\(trial {first.number}"):
        check_slot(study, second, {"lora_rank": 4}, limit=None, grid=False)


def test_storage_errors_are_one_line(tmp_path):
    from loralab.errors import LoralabError

    with pytest.raises(LoralabError, match="not a database URL"):
        sweep_workers.make_storage("my-db", tmp_path)
    with pytest.raises(LoralabError, match=r"cannot open nosuchdb://u:\*\*\*@h/db"):
        sweep_workers.make_storage("nosuchdb://u:secret@h/db", tmp_path)
    assert sweep_workers.redact("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
