"""Cells handed out to workers through Optuna's storage: no home-made queue, no cell trained twice, none lost.

Every cell is an Optuna trial *enqueued* in one study (``enqueue_trial``, state WAITING, its cell key in the
trial's user attributes), in an RDB storage: SQLite for the workers of one machine, PostgreSQL or MySQL for
workers on several machines. The guarantees come from the storage:

==========================  ==========================================================================
event                       what happens
==========================  ==========================================================================
worker asks for work        ``set_trial_state_values(WAITING -> RUNNING)`` is a row update under a lock:
                            exactly one worker gets a trial (the same call ``Study.ask`` makes)
worker trains               a thread records Optuna's heartbeat for the trial every ``heartbeat_s``
worker finishes             the trial is told COMPLETE with the cell's score
worker dies (kill -9,       its trial keeps RUNNING with a heartbeat that stops; after ``grace_s`` any
machine lost)               worker's ``fail_stale_trials`` marks it FAIL and Optuna's
                            ``RetryHeartbeatStaleTrialCallback`` enqueues a copy (same cell key): the next worker
                            resumes the cell from its ``last.pt`` when the study folder is shared
a cell's run fails          the trial is told FAIL; the next ``medmtl study`` enqueues the cell again
study is re-run             cells with a COMPLETE, RUNNING or WAITING trial are not enqueued again
two enqueues raced          the worker that claims a trial whose cell already has a COMPLETE trial, or a
                            RUNNING one with a lower number, closes it as PRUNED (``duplicate_of``)
==========================  ==========================================================================
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from medmtl.errors import InputError

# heartbeats, stale-trial reaping and their retry callback are marked experimental by Optuna (since 2.8)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

__all__ = ["CellQueue", "Claim", "run_worker", "open_storage", "CELL_ATTR"]

CELL_ATTR = "cell"
_LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def open_storage(url: str, *, heartbeat_s: int | None = None, grace_s: int | None = None, max_retry: int = 3) -> RDBStorage:
    """An Optuna RDB storage; with ``heartbeat_s``, lost trials are retried up to ``max_retry`` times."""
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    try:
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if heartbeat_s else None
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s,
                          heartbeat_stale_trial_callback=retry)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds; the user needs the URL and the cause
        raise InputError(f"cannot open the Optuna storage {url}: {err}; check --storage or the file's storage key") from err


@dataclass(frozen=True)
class Claim:
    """A trial this worker holds: its id, number and cell key."""

    trial_id: int
    number: int
    cell: str


class CellQueue:
    """The cells of one study as trials of one Optuna study (see the module docstring)."""

    def __init__(self, storage_url: str, name: str, *, heartbeat_s: int = 30, grace_s: int = 120, max_retry: int = 3) -> None:
        self.storage = open_storage(storage_url, heartbeat_s=heartbeat_s, grace_s=grace_s, max_retry=max_retry)
        self.heartbeat_s = heartbeat_s
        self.study = optuna.create_study(study_name=name, storage=self.storage, direction="maximize", load_if_exists=True)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _by_cell(self) -> dict[str, list[FrozenTrial]]:
        out: dict[str, list[FrozenTrial]] = {}
        for t in self.study.get_trials(deepcopy=False):
            if CELL_ATTR in t.user_attrs:
                out.setdefault(t.user_attrs[CELL_ATTR], []).append(t)
        return out

    def enqueue(self, cells: dict[str, dict[str, str]]) -> int:
        """Enqueue every cell (key -> attributes) without a COMPLETE, RUNNING or WAITING trial; returns how many."""
        have = self._by_cell()
        n = 0
        for key, attrs in cells.items():
            if any(t.state in _LIVE for t in have.get(key, [])):
                continue
            self.study.enqueue_trial({}, user_attrs={CELL_ATTR: key, **attrs})
            n += 1
        return n

    def states(self) -> dict[str, str]:
        """Cell key -> the best state among its trials (COMPLETE > RUNNING > WAITING > others)."""
        rank = {TrialState.COMPLETE: 0, TrialState.RUNNING: 1, TrialState.WAITING: 2, TrialState.FAIL: 3, TrialState.PRUNED: 4}
        return {k: min((t.state for t in ts), key=lambda s: rank[s]).name for k, ts in self._by_cell().items()}

    def completed(self) -> dict[str, FrozenTrial]:
        """Cell key -> its COMPLETE trial."""
        return {k: t for k, ts in self._by_cell().items() for t in ts if t.state == TrialState.COMPLETE}

    def reap(self) -> None:
        """Fail trials whose worker stopped sending heartbeats; the retry callback enqueues them again."""
        optuna.storages.fail_stale_trials(self.study)

    def claim(self) -> Claim | None:
        """Take one WAITING trial (atomically, as ``Study.ask`` does); None when none is waiting."""
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            if not self.storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue  # another worker was faster
            self.storage.record_heartbeat(t._trial_id)
            self.storage.set_trial_system_attr(t._trial_id, "worker", self.worker)
            key = t.user_attrs.get(CELL_ATTR)
            others = [o for o in self._by_cell().get(key, []) if o.number != t.number]
            dup = next((o for o in others if o.state == TrialState.COMPLETE
                        or (o.state == TrialState.RUNNING and o.number < t.number)), None)
            if key is None or dup is not None:
                self.storage.set_trial_system_attr(t._trial_id, "duplicate_of", dup.number if dup else -1)
                self.storage.set_trial_state_values(t._trial_id, state=TrialState.PRUNED)
                continue
            return Claim(trial_id=t._trial_id, number=t.number, cell=key)
        return None

    @contextlib.contextmanager
    def heartbeat(self, claim: Claim) -> Iterator[None]:
        """Record Optuna's heartbeat for ``claim`` every ``heartbeat_s`` while the block runs."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                with contextlib.suppress(Exception):  # a missed beat is retried; grace_s covers several
                    self.storage.record_heartbeat(claim.trial_id)

        th = threading.Thread(target=beat, name=f"heartbeat-{claim.number}", daemon=True)
        th.start()
        try:
            yield
        finally:
            stop.set()
            th.join()

    def set_attr(self, claim: Claim, key: str, value) -> None:
        """Store a user attribute on the claimed trial (e.g. its MLflow run id)."""
        self.storage.set_trial_user_attr(claim.trial_id, key, value)

    def finish(self, claim: Claim, value: float | None) -> None:
        """COMPLETE with ``value``, or FAIL when ``value`` is None."""
        if value is None:
            self.storage.set_trial_state_values(claim.trial_id, state=TrialState.FAIL)
        else:
            self.storage.set_trial_state_values(claim.trial_id, state=TrialState.COMPLETE, values=[float(value)])

    def wall_time(self, cells: set[str] | None = None) -> tuple[float, float]:
        """``(seconds from the first trial's start to the last one's end, seconds summed)`` over the COMPLETE trials of ``cells`` (default all)."""
        done = [t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.datetime_start and t.datetime_complete and (cells is None or t.user_attrs.get(CELL_ATTR) in cells)]
        if not done:
            return 0.0, 0.0
        span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
        return span.total_seconds(), sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)

    def has_running(self) -> bool:
        """True while some worker holds a trial."""
        return bool(self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def run_worker(queue: CellQueue, run_cell: Callable[[str], float], *, poll_s: float | None = None,
               log: Callable[[str], None] = print) -> int:
    """Train cells until none is waiting or running; returns how many this worker finished.

    ``run_cell(key)`` trains one cell (resuming it when it has a checkpoint) and returns its score.
    While other workers still hold cells, this one waits and reaps lost ones, so a cell whose
    worker died is taken over instead of being left behind. A failing cell is recorded as FAIL
    and the worker goes on; Ctrl-C records FAIL and stops.
    """
    poll = poll_s if poll_s is not None else max(1.0, queue.heartbeat_s / 2)
    done = 0
    while True:
        queue.reap()
        claim = queue.claim()
        if claim is None:
            if not queue.has_running():
                return done
            time.sleep(poll)
            continue
        log(f"[{queue.worker}] cell {claim.cell} (trial {claim.number})")
        with queue.heartbeat(claim):
            try:
                value = run_cell(claim.cell)
            except KeyboardInterrupt:
                queue.finish(claim, None)
                raise
            except Exception as err:  # noqa: BLE001 - one failed cell must not stop the study; the error is kept
                log(f"[{queue.worker}] cell {claim.cell} failed: {type(err).__name__}: {err}")
                queue.set_attr(claim, "error", f"{type(err).__name__}: {err}"[:2000])
                queue.finish(claim, None)
                continue
        queue.finish(claim, value)
        done += 1
