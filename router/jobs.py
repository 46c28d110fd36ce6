"""The job state machine: pure, no I/O. `handle(job, event)` returns the job after the event.

    queued --lease--> running --succeed--> succeeded
      ^                  |  \\--fail / expire (attempts left)--> queued
      |                  |   \\-fail / expire (none left, or a final failure)--> failed
      +----cancel--------+----cancel--> cancelled

A lease says which worker runs the job and until when; a running job whose lease expired
(the worker died, the node restarted) goes back to the queue, or fails when it has used
its attempts. Every error is kept. Terminal states accept nothing.

Several routers share one queue (PostgreSQL): the lease's `worker` names its holder (a router,
`<node name>/<pid>`). An event that says who sends it (`worker`) happens only to a job that this
holder leased: a router whose lease was taken over cannot renew, finish or fail it. A holder known
to be gone (its node's router restarted) loses its lease at once (`Expire(gone=...)`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


class IllegalTransition(ValueError):
    """The event cannot happen to a job in its state."""


@dataclass(frozen=True)
class Job:
    id: str
    state: str = QUEUED
    attempts: int = 0                  # leases taken so far
    max_attempts: int = 3
    worker: str | None = None
    lease_expires: float | None = None
    errors: tuple[str, ...] = ()       # one per failed attempt, oldest first
    started_at: float | None = None    # of the current (or last) attempt
    finished_at: float | None = None


@dataclass(frozen=True)
class Lease:
    worker: str
    now: float
    seconds: float


@dataclass(frozen=True)
class Renew:
    now: float
    seconds: float
    worker: str | None = None          # the holder renewing: only its own lease


@dataclass(frozen=True)
class Succeed:
    now: float
    worker: str | None = None          # the holder reporting: only its own job


@dataclass(frozen=True)
class Fail:
    now: float
    error: str
    final: bool = False                # the inputs cannot work (bad input): no attempt left to make
    worker: str | None = None          # the holder reporting: only its own job


@dataclass(frozen=True)
class Expire:
    now: float
    gone: str | None = None            # a holder known to be dead: its lease ends now


@dataclass(frozen=True)
class Cancel:
    now: float
    reason: str = field(default="cancelled")


Event = Lease | Renew | Succeed | Fail | Expire | Cancel


def handle(job: Job, event: Event) -> Job:
    """The job after `event`; IllegalTransition if the event cannot happen now."""
    if isinstance(event, Lease):
        _expect(job, event, QUEUED)
        return replace(job, state=RUNNING, attempts=job.attempts + 1, worker=event.worker,
                       lease_expires=event.now + event.seconds, started_at=event.now, finished_at=None)
    if isinstance(event, Renew):
        _expect(job, event, RUNNING)
        _held_by(job, event)
        return replace(job, lease_expires=event.now + event.seconds)
    if isinstance(event, Succeed):
        _expect(job, event, RUNNING)
        _held_by(job, event)
        return replace(job, state=SUCCEEDED, lease_expires=None, finished_at=event.now)
    if isinstance(event, Fail):
        _expect(job, event, RUNNING)
        _held_by(job, event)
        return _failed_attempt(job, event.now, event.error, event.final)
    if isinstance(event, Expire):
        _expect(job, event, RUNNING)
        if event.gone is not None and event.gone == job.worker:
            return _failed_attempt(job, event.now, f"worker {job.worker} gone (its router restarted)")
        if job.lease_expires is None or event.now < job.lease_expires:
            raise IllegalTransition(f"job {job.id}: lease of {job.worker} still valid")
        return _failed_attempt(job, event.now, f"lease expired: worker {job.worker} lost")
    if isinstance(event, Cancel):
        _expect(job, event, QUEUED, RUNNING)
        return replace(job, state=CANCELLED, lease_expires=None, finished_at=event.now)
    raise IllegalTransition(f"unknown event {event!r}")  # pragma: no cover


def _failed_attempt(job: Job, now: float, error: str, final: bool = False) -> Job:
    errors = job.errors + (f"attempt {job.attempts}: {error}",)
    if final or job.attempts >= job.max_attempts:
        return replace(job, state=FAILED, errors=errors, lease_expires=None, worker=None, finished_at=now)
    return replace(job, state=QUEUED, errors=errors, lease_expires=None, worker=None)


def _held_by(job: Job, event: Renew | Succeed | Fail) -> None:
    if event.worker is not None and event.worker != job.worker:
        raise IllegalTransition(f"job {job.id}: leased to {job.worker}, not to {event.worker}")


def _expect(job: Job, event: Event, *states: str) -> None:
    if job.state not in states:
        raise IllegalTransition(f"job {job.id}: {type(event).__name__.lower()} is not possible when "
                                f"{job.state} (only when {' or '.join(states)})")
