"""Several workers, one Optuna study: the parts of a shared sweep that Optuna leaves to us.

What Optuna does: the storage (a journal file for workers on one machine, an RDB such as PostgreSQL
for several machines), atomic trial numbers, popping queued (WAITING) trials, grid points by trial
number (GridSampler), and, on RDB storage, heartbeats that fail the trials of a worker that stopped
beating, handed to `RetryHeartbeatStaleTrialCallback`, which queues a copy with the same parameters.

What is ours, because Optuna does not cover it:
- a worker killed on THIS machine is seen at once from its process id (the journal file has no
  heartbeat, and a heartbeat would make the next run wait out the grace period); its trial, and one
  stopped by Ctrl-C, is failed and queued again through the same Optuna retry callback;
- the budget is exact: `study.optimize(n_trials=...)` counts per worker, so workers that start
  together would overshoot; a trial over the budget is skipped before it trains;
- a grid point, a retry or the base-config trial that two workers queued at the same moment runs
  once ("the smaller trial number wins", the same answer in every worker whatever the timing).

Every trial of the study is one of: counted (a real trial of the budget: waiting, running or
finished), replaced (its worker died or was interrupted; a retry with the same parameters was
queued), or skipped (started over the budget or as a duplicate; never trained).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import socket
import time
import warnings
from pathlib import Path

from loralab.errors import LoralabError

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna_journal.log"  # the default storage, in the sweep folder


# --- storage ------------------------------------------------------------------------------------------
def redact(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (for logs and files)."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        cred, _, host = rest.rpartition("@")
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{scheme}://{cred}@{host}"
    return url


def make_storage(url: str | None, sweep_dir: Path, heartbeat_seconds: int = 60):
    """The journal file in the sweep folder (default), or an Optuna RDB storage for `url` with heartbeats:
    a trial whose worker stopped beating for 2 x heartbeat_seconds is failed and queued again."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    if url is None:
        path = str(sweep_dir / JOURNAL_FILE)
        return optuna.storages.JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
    if "://" not in url:
        raise LoralabError(
            f"storage: {url!r} is not a database URL; expected e.g. postgresql://user:pass@host/db or sqlite:///file.db"
        )
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    url = _with_driver(url)
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_seconds,
                    grace_period=2 * heartbeat_seconds,
                    heartbeat_stale_trial_callback=retry,
                    engine_kwargs={"pool_pre_ping": True},
                )
        except (IntegrityError, ProgrammingError) as e:
            # Workers started together on a fresh database race to create Optuna's tables: the
            # loser sees "already exists"; a moment later the tables are there.
            if attempt == 4:
                err = e
            else:
                time.sleep(1.0 + attempt)
                continue
        except Exception as e:  # bad URL, server down, missing driver
            err = e
        why = (str(err).strip().splitlines() or [""])[0][:200]  # one line, with the password hidden
        hint = (
            "; for PostgreSQL: pip install psycopg2-binary (loralab[postgres])" if isinstance(err, ImportError) else ""
        )
        raise LoralabError(f"storage: cannot open {redact(url)} ({type(err).__name__}: {why}){hint}") from None


def _with_driver(url: str) -> str:
    """postgresql://... -> postgresql+psycopg2://... when psycopg2 is installed and psycopg 3 is not
    (SQLAlchemy 2.1 picks psycopg 3 for a bare postgresql:// URL)."""
    scheme, sep, rest = url.partition("://")
    if (
        scheme in ("postgresql", "postgres")
        and importlib.util.find_spec("psycopg") is None
        and importlib.util.find_spec("psycopg2") is not None
    ):
        return f"postgresql+psycopg2://{rest}"
    return url


# --- which trials count ---------------------------------------------------------------------------------
def worker_identity() -> dict:
    """This process, as recorded on the trial it runs: enough to tell later whether it is still alive."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def worker_alive(worker: dict) -> bool:
    """Is the process of `worker_identity()` still running (same pid AND same start time)?"""
    import psutil

    try:
        return abs(psutil.Process(int(worker["pid"])).create_time() - float(worker["started"])) < 1.0
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def retry_of(trial) -> int | None:
    """The trial this one re-runs, or None."""
    # Where RetryHeartbeatStaleTrialCallback records it (its retry_history() reads the same, with a
    # warning on every call while it is experimental).
    history = trial.system_attrs.get("retry_history")
    if history:
        return history[-1]
    return trial.user_attrs.get("retry_of")  # sweeps made before loralab used Optuna's retry callback


def counted_trials(trials) -> list:
    """The trials of the budget: not replaced by a retry, not skipped."""
    replaced = {retry_of(t) for t in trials} - {None}
    return [t for t in trials if t.number not in replaced and "skipped" not in t.user_attrs]


def retry(study, trial) -> None:
    """Queue `trial` again with the same parameters (it was killed, not bad); also Optuna's stale-trial callback.

    Optuna's RetryHeartbeatStaleTrialCallback makes the WAITING copy (same parameters and grid point,
    the retry history in its system attributes). The copy carries none of our notes on the old trial
    (its worker, run folder or error) except that it is the base-config trial: a copy that still named
    the dead worker could be taken for dead itself the moment another worker pops it.
    """
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    keys = study.user_attrs.get("search_keys")
    if keys is not None and set(trial.params) != set(keys):
        log.warning("trial %d: died before its parameters were set; not re-queued", trial.number)
        return
    clean = copy.copy(trial)
    clean.system_attrs = copy.deepcopy(trial.system_attrs)  # the callback appends to the retry history in place
    clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k == "base_config"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)  # stable in use since Optuna 2.8
        RetryHeartbeatStaleTrialCallback()(study, clean)
    log.info("trial %d: re-queued (its worker stopped before it finished)", trial.number)


def recover_dead_trials(study) -> None:
    """Trials left RUNNING by a dead worker on this host, or interrupted (Ctrl-C): fail and re-queue them."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {retry_of(t) for t in trials} - {None}
    host = socket.gethostname()
    for t in trials:
        if t.number in retried or "skipped" in t.user_attrs:
            continue
        w = t.user_attrs.get("worker")
        if t.state == TrialState.RUNNING and w and w.get("host") == host and not worker_alive(w):
            try:
                # Optuna's storage directly: `study.tell` would also run the sampler's after-trial hook
                # (GridSampler may stop the study there), and no public call annotates another's trial.
                study._storage.set_trial_user_attr(
                    t._trial_id, "error", f"worker {host}:{w['pid']} died while running it"
                )
                # The state change is the lock: of two workers recovering at once, one wins.
                study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except (UpdateFinishedTrialError, RuntimeError):
                continue
            retry(study, t)
        elif t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
            retry(study, t)  # a duplicate retry from a concurrent resume is skipped at its start


# --- may this trial run? ----------------------------------------------------------------------------------
class Skip(Exception):
    """This trial must not run (over budget, or a duplicate); recorded as FAIL with `skipped`."""


def check_slot(study, trial, params: dict, limit: int | None, grid: bool) -> None:
    """Raise Skip for a trial over the budget `limit`, a duplicate retry or base-config trial, or (grid) a
    grid point an earlier trial already has.

    Trial numbers are handed out atomically by the storage, so "the smaller number wins" gives the
    same answer in every worker, whatever the timing.
    """
    from optuna.trial import TrialState

    for _ in range(60):
        trials = study.get_trials(deepcopy=False)
        before = [t for t in counted_trials(trials) if t.number < trial.number]
        if limit is not None and len(before) >= limit:
            raise Skip(f"over budget: {limit} trials already started")
        me = next(t for t in trials if t.number == trial.number)  # as stored (a live Trial has no system attrs)
        for mark, what in (
            (retry_of, "retry of trial"),
            (lambda t: t.user_attrs.get("base_config"), "base-config trial"),
        ):
            mine = mark(me)
            twin = [t.number for t in before if mine is not None and mark(t) == mine]
            if twin:  # two workers queued the same thing at once: the smaller number runs it
                raise Skip(f"duplicate {what} (trial {twin[0]} has it)")
        if not grid:
            return
        unset = [
            t
            for t in before
            if t.state in (TrialState.RUNNING, TrialState.WAITING)
            and len(t.params) < len(params)
            and "fixed_params" not in t.system_attrs
        ]
        same = [t.number for t in before if (t.params or t.system_attrs.get("fixed_params")) == params]
        if same:
            raise Skip(f"duplicate grid point (trial {same[0]} has it)")
        if not unset:
            return
        time.sleep(0.5)  # a smaller trial has just started and not set its parameters yet
    raise Skip("gave up waiting for earlier trials to set their parameters")
