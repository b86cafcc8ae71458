"""Worker processes forked from this one (`soundtag.workers`): each holds the
object it inherited, runs its start hook, leaves Ctrl-C to its parent, runs
torch on one thread, and a worker that dies fails the job with one error."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from soundtag.workers import WorkerDied, Workers


class Owner:
    def __init__(self) -> None:
        self.started = False
        self.offset = 100  # set here, before the fork: the workers see it without pickling

    def start(self) -> None:
        self.started = True

    def square(self, x: int) -> tuple[int, int, bool]:
        return self.offset + x * x, os.getpid(), self.started

    def settings(self, _: object) -> tuple[bool, int]:
        return signal.getsignal(signal.SIGINT) == signal.SIG_IGN, torch.get_num_threads()

    def die(self, _: object) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def test_each_share_is_run_by_a_worker_holding_the_object_it_inherited():
    owner = Owner()
    with Workers(owner, 2, owner.start) as workers:
        results = dict(workers.run("square", [1, 2, 3, 4, 5]))
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert [results[i][0] for i in range(5)] == [101, 104, 109, 116, 125]
    pids = {pid for _, pid, _ in results.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    assert all(started for _, _, started in results.values())  # the start hook ran in each worker
    assert not owner.started  # and not here


def test_a_worker_leaves_ctrl_c_to_its_parent_and_runs_torch_on_one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what the worker would inherit
    try:
        with Workers(Owner(), 1) as workers:
            [(_, (ignores_ctrl_c, threads))] = list(workers.run("settings", [None]))
    finally:
        torch.set_num_threads(before)
    assert ignores_ctrl_c and threads == 1
    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN


def test_a_worker_that_dies_fails_the_job_with_one_error():
    with Workers(Owner(), 2) as workers, pytest.raises(WorkerDied, match="a worker process died"):
        list(workers.run("die", [None, None, None]))


def test_killing_workers_already_closed_does_nothing():
    workers = Workers(Owner(), 1)
    workers.close()
    workers.kill()  # a job failing after another thread closed its workers kills them again
