"""Rank-0 logging: TensorBoard scalars and image grids, a tqdm bar, plain lines for log files."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch


class Logger:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = True, progress: bool = True):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only
            self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"))
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stderr,
                            disable=not sys.stderr.isatty())
        self._t0 = time.time()

    def print(self, *msg) -> None:
        if not self.enabled:
            return
        line = " ".join(str(m) for m in msg)
        if self.bar is not None and not self.bar.disable:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def scalars(self, values: dict, step: int) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, float(v), step)

    def image(self, tag: str, grid: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, grid, step)  # grid (3, H, W) in [0, 1]

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{float(v):.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
