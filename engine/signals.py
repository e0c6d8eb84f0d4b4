"""Preemption: SIGTERM or SIGUSR1 (or hfai's suspend command) asks the trainer to finish the current step,
save, and exit cleanly."""
from __future__ import annotations

import signal
import threading


class StopRequest:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), poll_hfai: bool | None = None,
                 poll_seconds: float = 1.0):
        """poll_hfai: watch hfai's suspend command (default: when this process is hfai's rank 0)."""
        self.signum: int | None = None
        self.reason = ""
        self._previous = {}
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        if poll_hfai is None:
            from engine import launch

            found = launch.detect()
            poll_hfai = found.kind == "hfai" and found.rank == 0
        self._done = threading.Event()
        self._client = None
        if poll_hfai:
            from engine.launch import hfai_client

            self._client = hfai_client()
            threading.Thread(target=self._poll, args=(poll_seconds,), daemon=True, name="hfai-suspend").start()

    def _handle(self, signum, frame) -> None:
        self.signum = signum  # only a flag: the loop saves at the next step boundary, where state is whole

    def _poll(self, seconds: float) -> None:
        while not self._done.is_set():
            if self._client.receive_suspend_command():
                self.reason = "hfai's suspend command"
                return
            self._done.wait(seconds)

    @property
    def requested(self) -> bool:
        return self.signum is not None or bool(self.reason)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else self.reason

    def restore(self) -> None:
        """Put the previous handlers back; after a suspend command (the checkpoint is saved by now), tell
        hfai the process may be suspended."""
        self._done.set()
        for s, h in self._previous.items():
            signal.signal(s, h)
        if self.reason and self._client is not None:
            self._client.go_suspend()
