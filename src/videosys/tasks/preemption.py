"""Stop requests from a scheduler: a Slurm time limit (submitit asks for SIGUSR2 some time before it)
or a preemption (SIGTERM). Training notes the signal, saves a checkpoint at the end of the current
step on every rank, and then hands the signal to whoever handled it before: submitit requeues the job,
which resumes from that checkpoint; without a launcher the default action ends the process."""

from __future__ import annotations

import logging
import signal
import threading

import torch

from videosys.distributed.collectives import CommGroup

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# Several ranks act on a signal this many steps after the all-reduce that spreads it (see requested()).
READ_LAG = 2


class StopRequest:
    """A context that records stop signals instead of dying mid-step (signal handlers run only on the
    main thread; elsewhere it records nothing)."""

    def __init__(self):
        self.signum: int | None = None
        self.previous: dict[int, object] = {}
        self.in_flight: list[torch.Tensor] = []  # flag reductions started, oldest first

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _record(self, signum, frame) -> None:
        self.signum = signum
        log.warning("received %s: checkpointing at the end of this step", signal.Signals(signum).name)

    def _restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def requested(self, world: CommGroup, device: torch.device) -> bool:
        """Whether any rank got a stop signal; every rank gets the same answer at the same step.

        Each call all-reduces this rank's flag without waiting, and reads the reduction started
        READ_LAG calls earlier: by then it has finished, so a step never waits on the network or stalls
        the GPU queue for it, and all ranks still decide at the same step."""
        if world.size == 1:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else int(self.signum)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=world.group)
        self.in_flight.append(flag)
        if len(self.in_flight) <= READ_LAG:
            return False
        signum = int(self.in_flight.pop(0).item())
        if signum and self.signum is None:
            self.signum = signum
        return bool(signum)

    def hand_over(self) -> None:
        """Give the signal to the handler that was there before (submitit's requeue), or its default."""
        signum, previous = self.signum, self.previous.get(self.signum)
        self._restore()
        if callable(previous):
            previous(signum, None)
        else:
            signal.raise_signal(signum)
        # Still here: that handler ignores the signal (submitit's for SIGTERM). Train on, listening again.
        self.signum = None
        self.in_flight = []
        self.__enter__()
