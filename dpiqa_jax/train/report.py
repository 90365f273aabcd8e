"""What a run writes for people: DIR/metrics.jsonl, TensorBoard events in DIR/tensorboard,
DIR/results.json, and a progress bar. Only process 0 writes; the others get no-ops."""
import json
import math
import os
import time
from typing import Optional

import jax
from tqdm import tqdm


class Reporter:
    def __init__(self, workdir: str, total_steps: int, first_step: int, images_per_step: int):
        self.workdir, self.images_per_step = workdir, images_per_step
        self.active = jax.process_index() == 0
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            _truncate_after(self.metrics_path, first_step)
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not self.active, dynamic_ncols=True,
                        unit="step", desc="train")
        self._window = (first_step, time.perf_counter())

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def images_per_second(self, step: int) -> float:
        """Throughput since the previous call (the log window), wall clock."""
        last_step, last_time = self._window
        now = time.perf_counter()
        self._window = (step, now)
        return (step - last_step) * self.images_per_step / max(now - last_time, 1e-9)

    def write(self, step: int, split: str, values: dict) -> None:
        """One record of metrics.jsonl and its TensorBoard scalars (tag `split/name`)."""
        if not self.active:
            return
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in values.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._writer()
        with writer.as_default(step=int(step)):
            import tensorflow as tf

            for name, value in record.items():
                if name not in ("step", "split") and isinstance(value, (int, float)):
                    tf.summary.scalar(f"{split}/{name}", value)
        writer.flush()
        if split == "train":
            self.bar.set_postfix(loss=f"{values.get('loss', math.nan):.4g}",
                                 img_s=f"{values.get('images_per_second', 0):.1f}", refresh=False)
        else:
            self.bar.write(f"step {step} {split}: " + " ".join(
                f"{k} {v:.4f}" for k, v in record.items() if k in ("srcc", "plcc", "krcc", "rmse")))

    def results(self, final: dict, best: dict) -> None:
        """DIR/results.json: the final evaluation and the best of each metric, with its step."""
        if self.active:
            with open(os.path.join(self.workdir, "results.json"), "w") as f:
                json.dump({"final": final, "best": best}, f, indent=2)

    def close(self) -> None:
        self.bar.close()
        if self._tb is not None:
            self._tb.close()

    def _writer(self):
        if self._tb is None:
            import tensorflow as tf

            tf.config.set_visible_devices([], "GPU")  # TF must leave accelerators to JAX
            self._tb = tf.summary.create_file_writer(os.path.join(self.workdir, "tensorboard"))
        return self._tb


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def _truncate_after(path: str, step: int) -> None:
    """A resumed run repeats the steps after its checkpoint: drop their old records."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r["split"] == split]
