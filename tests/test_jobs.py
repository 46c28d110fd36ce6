"""The job state machine, without I/O: every legal path and every illegal transition."""
from __future__ import annotations

import itertools

import pytest

from router.jobs import (CANCELLED, FAILED, QUEUED, RUNNING, STATES, SUCCEEDED, Cancel, Expire, Fail,
                         IllegalTransition, Job, Lease, Renew, Succeed, handle)

EVENTS = {
    "lease": Lease("w1", 100.0, 30.0),
    "renew": Renew(110.0, 30.0),
    "succeed": Succeed(120.0),
    "fail": Fail(120.0, "boom"),
    "expire": Expire(1000.0),
    "cancel": Cancel(120.0),
}
LEGAL = {
    QUEUED: {"lease", "cancel"},
    RUNNING: {"renew", "succeed", "fail", "expire", "cancel"},
    SUCCEEDED: set(), FAILED: set(), CANCELLED: set(),
}


def in_state(state: str) -> Job:
    queued = Job("j1", max_attempts=1)
    running = handle(queued, Lease("w0", 0.0, 30.0))
    return {QUEUED: queued, RUNNING: running, SUCCEEDED: handle(running, Succeed(1.0)),
            FAILED: handle(running, Fail(1.0, "x")), CANCELLED: handle(running, Cancel(1.0))}[state]


@pytest.mark.parametrize("state,event", list(itertools.product(STATES, EVENTS)))
def test_every_transition_is_legal_or_refused(state, event):
    job = in_state(state)
    assert job.state == state
    if event in LEGAL[state]:
        handle(job, EVENTS[event])
    else:
        with pytest.raises(IllegalTransition, match=f"{event} is not possible when {state}"):
            handle(job, EVENTS[event])


def test_lease_runs_and_succeeds():
    job = handle(Job("j"), Lease("worker-a", 10.0, 60.0))
    assert (job.state, job.attempts, job.worker, job.lease_expires, job.started_at) == (RUNNING, 1, "worker-a", 70.0, 10.0)
    job = handle(job, Renew(50.0, 60.0))
    assert job.lease_expires == 110.0
    job = handle(job, Succeed(60.0))
    assert (job.state, job.finished_at, job.lease_expires) == (SUCCEEDED, 60.0, None)


def test_failures_requeue_until_the_attempts_are_used_and_keep_every_error():
    job = Job("j", max_attempts=3)
    for attempt in (1, 2):
        job = handle(handle(job, Lease("w", 0.0, 10.0)), Fail(1.0, f"error {attempt}"))
        assert job.state == QUEUED and job.worker is None
    job = handle(handle(job, Lease("w", 0.0, 10.0)), Fail(1.0, "error 3"))
    assert job.state == FAILED and job.attempts == 3
    assert job.errors == ("attempt 1: error 1", "attempt 2: error 2", "attempt 3: error 3")


def test_an_expired_lease_requeues_and_a_valid_one_cannot_expire():
    job = handle(Job("j"), Lease("w", 0.0, 30.0))
    with pytest.raises(IllegalTransition, match="still valid"):
        handle(job, Expire(29.9))
    job = handle(job, Expire(30.0))
    assert job.state == QUEUED and job.errors == ("attempt 1: lease expired: worker w lost",)


def test_cancel_from_queued_and_running():
    assert handle(Job("j"), Cancel(5.0)).state == CANCELLED
    running = handle(Job("j"), Lease("w", 0.0, 30.0))
    cancelled = handle(running, Cancel(5.0))
    assert (cancelled.state, cancelled.lease_expires, cancelled.finished_at) == (CANCELLED, None, 5.0)


def test_a_final_failure_does_not_wait_for_more_attempts():
    job = handle(Job("j", max_attempts=3), Lease("w", 0.0, 10.0))
    job = handle(job, Fail(1.0, "not a mammogram", final=True))
    assert (job.state, job.attempts, job.errors) == (FAILED, 1, ("attempt 1: not a mammogram",))
