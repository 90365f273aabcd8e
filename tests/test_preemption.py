"""SIGTERM on one host of a multi-host run: every process stops after the same step (JAX's
preemption sync point), so that they all save that step together. The loop's save-and-stop path
itself is tested end to end in test_train_loop.py."""
import os
import signal
import subprocess
import sys
import time

import pytest
from train_helpers import REPO, free_port


@pytest.mark.parametrize("signalled", [0, 1])
def test_sigterm_on_one_process_stops_both_after_the_same_step(signalled):
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               PYTHONPATH=str(REPO / "tests"))
    script = str(REPO / "tests" / "preemption_script.py")
    procs = [subprocess.Popen([sys.executable, script, str(port), str(i)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["running", "running"]
        time.sleep(0.5)
        procs[signalled].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    last = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert last[0] == last[1] and last[0].startswith("stopped after "), last
