"""SLURM preemption and time limits: the job is requeued and resumes into the same MLflow run.

submitit sends the job its "usr" signal (SIGUSR2) before SLURM preempts it or its time runs out;
for a `Checkpointable` callable it then calls `checkpoint(...)`, requeues the job (`scontrol
requeue`; the local executor restarts it) and exits. `VariantTask` is that callable: the
requeued job calls it again with the same `VariantJob`, and it resumes from the newest checkpoint
that verifies in the variant's folder (written every `train.eval_every` steps), into the run the
driver prepared (which stays RUNNING and leased by the waiting driver meanwhile).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import submitit

from lab import checkpoints, track
from lab import record as R


class VariantTask(submitit.helpers.Checkpointable):
    """`run(job)` (lab.launch.run_job) that survives preemption: each (re)start resumes from the
    newest good checkpoint."""

    def __init__(self, run: Callable[[Any], Any]) -> None:
        self.run = run  # a module-level function: pickled by reference with the task
        self.starts = 0

    def __call__(self, job: Any) -> Any:
        self.starts += 1
        if self.starts > 1:
            job = resumed(job)
        return self.run(job)

    def checkpoint(self, job: Any) -> Any:  # called by submitit on SIGUSR2, before the requeue
        return submitit.helpers.DelayedSubmission(self, job)


def resumed(job: Any) -> Any:
    """The job (a lab.launch.VariantJob), set to resume from the newest checkpoint that verifies in its
    folder (if it owns one)."""
    uri = job.ctx.uri
    ckdir = track.checkpoint_dir(job.variant, uri)
    if checkpoints.owner(ckdir) != job.run_id:
        return job
    last, notes = checkpoints.pick_resume(ckdir)
    if last is None:
        return job
    cl = track.client(uri)
    run = cl.get_run(job.run_id)
    tags = {
        **checkpoints.resume_tags(run.data.tags, Path(last), notes),
        R.REQUEUED: int(run.data.tags.get(R.REQUEUED, "0")) + 1,
    }
    track.set_tags(cl, job.run_id, tags)
    job.resume_ckpt = str(last)
    job.record = dataclasses.replace(job.record, resumed=True)
    return job
