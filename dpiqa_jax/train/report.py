"""What a run writes for people: DIR/metrics.jsonl, TensorBoard events in DIR/tensorboard,
DIR/results.json, and a progress bar. Only process 0 writes; the others get no-ops."""
import json
import math
import os
import time
from typing import Optional

import jax
from tqdm import tqdm

from dpiqa_jax import tf_runtime


class Reporter:
    def __init__(self, workdir: str, total_steps: int, first_step: int, images_per_step: int):
        """A run resumed at `first_step` repeats what came after it: their old records are dropped
        (and the evaluation at `first_step` itself when that is the last step, which is redone)."""
        self.workdir, self.images_per_step = workdir, images_per_step
        self.active = jax.process_index() == 0
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.active:
            _truncate(self.metrics_path, first_step, redo_eval=first_step == total_steps)
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not self.active, dynamic_ncols=True,
                        unit="step", desc="train")
        self._window = (first_step, time.perf_counter())

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def first_step_done(self, read_back: bool) -> None:
        """Says how long the command took to its first step (imports, data, compile): the figure
        that the persistent compilation cache cuts on a rerun, and whether the train step was read
        back from its stored program (`exported`) rather than traced."""
        seconds = seconds_since_process_start()
        if seconds is not None:
            how = "compile included" + ("; the train step's stored program" if read_back else "")
            self.bar.write(f"first step done {seconds:.1f} s after the command started ({how})")

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
        self._tensorboard(step, split, record)
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

    def _tensorboard(self, step: int, split: str, record: dict) -> None:
        """Scalars as TensorBoard's scalar plugin writes them (tensorflow-cpu ships no `tensorboard`
        package, which tf.summary.scalar needs)."""
        from tensorflow.core.framework import summary_pb2

        tf = tf_runtime.tensorflow()
        if self._tb is None:
            self._tb = tf.summary.create_file_writer(os.path.join(self.workdir, "tensorboard"))
        scalar = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))
        with self._tb.as_default(step=int(step)):
            for name, value in record.items():
                if name not in ("step", "split") and isinstance(value, (int, float)):
                    tf.summary.write(f"{split}/{name}", tf.constant(value, tf.float32), metadata=scalar)
        self._tb.flush()


def run_line(mesh, batch_size: int, num_train: int, steps_per_epoch: int, total_steps: int,
             latest: Optional[int]) -> str:
    """One line that says what the run runs on and for how long: a multi-host launch shows here
    whether every process and device joined, and a rerun whether it resumes."""
    devices, processes = mesh.devices.size, jax.process_count()
    kind = mesh.devices.flat[0].device_kind
    where = f"resuming after step {latest}" if latest else "from step 0"
    mesh_axes = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    return (f"dpiqa-jax: {devices} device{'s' * (devices > 1)} ({kind}) in {processes} "
            f"process{'es' * (processes > 1)}, mesh {mesh_axes}; batch {batch_size} "
            f"({batch_size // devices} per device), {num_train} train images; steps: {total_steps} "
            f"({steps_per_epoch} per epoch), {where}")


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    return value


def _truncate(path: str, step: int, redo_eval: bool) -> None:
    if not os.path.exists(path):
        return
    keep = lambda r: r["step"] < step or (r["step"] == step and not (redo_eval and r["split"] != "train"))
    with open(path) as f:
        kept = [line for line in f if line.strip() and keep(json.loads(line))]
    with open(path, "w") as f:
        f.writelines(kept)


def read_metrics(workdir: str, split: Optional[str] = None) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


def seconds_since_process_start() -> Optional[float]:
    """Wall seconds since this process started, from Linux's /proc (None elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime - ticks / os.sysconf("SC_CLK_TCK")
