"""Preemption: SIGTERM or SIGUSR1 asks the trainer to finish the current step, save, and exit cleanly."""
from __future__ import annotations

import signal


class StopRequest:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.signum: int | None = None
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # only a flag: the loop saves at the next step boundary, where state is whole

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
