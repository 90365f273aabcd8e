"""Stopping cleanly on SIGTERM (spot VMs, preempted TPU/GPU machines, `kill`, SLURM's time limit).

Training saves the current step and stops at the first step where every process agrees to: JAX's
preemption sync point when several processes run (the coordination service spreads one host's
notice to all and picks a step they all reach), a flag set by a SIGTERM handler in a single process.
"""
import signal
import threading

import jax
from jax.experimental import multihost_utils

EXIT_CODE = 128 + signal.SIGTERM  # what schedulers expect of a job that stopped on SIGTERM


class Preempted(Exception):
    """The run saved its current step after a SIGTERM; rerunning the same command resumes."""


class PreemptionWatch:
    """`reached(step)`: whether to save and stop after `step`. Use as a context manager: a single
    process's SIGTERM handler is installed for the loop only (and only from the main thread, the
    one place Python delivers signals)."""

    def __init__(self):
        self.multi_process = jax.process_count() > 1
        self.received = False
        self._previous = None

    def __enter__(self):
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame):
        self.received = True

    def reached(self, step: int) -> bool:
        if self.multi_process:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.received
