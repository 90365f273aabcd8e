"""Run by test_train_loop.py as one of two jax.distributed processes on localhost: steps a
PreemptionWatch until it says stop, printing `running` once and `stopped after STEP` at the end."""
import sys
import time

import jax

from dpiqa_jax.train.preemption import PreemptionWatch

if __name__ == "__main__":
    port, process_id = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    with PreemptionWatch() as watch:
        for step in range(1, 100_000):
            if step == 1:
                print("running", flush=True)
            time.sleep(0.02)  # the processes run at different speeds, as hosts do
            if watch.reached(step):
                print(f"stopped after {step}", flush=True)
                break
