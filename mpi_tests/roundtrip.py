"""Checkpoint round trip shared by the parallel tests: a parallel run saves at iteration 2
and one process resumes to iteration 3; one process saves and the parallel layout resumes."""

import tempfile
from dataclasses import replace

from refgpt.engine import Trainer


def checkpoint_roundtrip(comm, model_cfg, base, parallel):
    """parallel(train_config) -> a Trainer of the parallel layout. Returns the trainers
    (straight single-process run, single process resumed, parallel resumed), all at the end."""
    quiet = dict(log=lambda *_: None)
    root = comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None)
    straight = Trainer(model_cfg(), base, **quiet)
    straight.run()
    parallel(replace(base, exit_interval=2, save=f"{root}/parallel")).run()
    comm.Barrier()
    serial = Trainer(model_cfg(), replace(base, load=f"{root}/parallel"), **quiet)
    serial.run()
    if comm.rank == 0:
        Trainer(model_cfg(), replace(base, exit_interval=2, save=f"{root}/serial"), **quiet).run()
    comm.Barrier()
    resumed = parallel(replace(base, load=f"{root}/serial"))
    resumed.run()
    return straight, serial, resumed
