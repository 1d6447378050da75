"""Optimizers that misbehave on purpose, for the sweep's isolation tests."""

import os
import signal
import time

import torch


class Crash(torch.optim.SGD):
    """Kills its own process on the first step, as a segfault or the OOM killer would."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, lr=lr)

    def step(self, closure=None):
        os.kill(os.getpid(), signal.SIGKILL)


class Slow(torch.optim.SGD):
    """Never finishes a step."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, lr=lr)

    def step(self, closure=None):
        time.sleep(3600)
