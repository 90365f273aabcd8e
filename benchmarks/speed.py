"""Speed of our teacher and student against the authors' PyTorch code: same device, same run, same weights.

    python benchmarks/speed.py                                    # batch 16, 512 px, every job
    python benchmarks/speed.py --jobs teacher_train unet --steps 20 --output speed.json
    python benchmarks/speed.py --tiny --batch 4 --steps 2 --warmup 1   # the CI check: it works, not its speed

Jobs: the teacher's training step, teacher inference, the U-Net alone (forward + backward + Adam),
the student's distillation step (teacher forward included) and student inference. As the configs
say (`model.cache_posteriors`), both training steps read the VAE's posteriors from the batch
instead of running the VAE (`--cache-posteriors off` puts it back); the baseline runs it.

Ours is the code the trainer runs: the steps of `teacher_task` (dpiqa_jax/train/loop.py) and of
dpiqa_jax/train/distill.py, on the trainer's mesh, state and shardings, compiled ahead of time (the
compile seconds are reported) and timed after warm-up steps. The baseline is the authors' way, built
from diffusers and the PyTorch modules of tests/torch_reference.py: fp16 autocast with a GradScaler
on CUDA (fp32 on the CPU unless --baseline-amp says otherwise), Adam lr 1e-5 (teacher) / 1e-4
(student), the VAE frozen, inference under no_grad. Both sides hold the same random weights (drawn
on the host, every parameter perturbed, loaded into each side by the PyTorch names); for the
inference jobs the table gives the relative difference of the two sides' scores on the same images,
which shows that the baseline computes the same function: ~1e-6 in float32 (`--dtype float32
--baseline-amp off`), ~1e-2 between our bfloat16 and the baseline's fp16.

Peak memory: PyTorch's is per job (`reset_peak_memory_stats`). JAX cannot reset its peak, so ours is
the process's peak when the job ends; the teacher's training step runs first, so its figure is its own.
The baseline runs first: PyTorch hands its cached memory back, JAX's allocator keeps what it took.
"""
import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import os
import platform
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

# Both frameworks share the device in one process: JAX must not take 75 % of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import profile_top  # noqa: E402 -- beside this script

from dpiqa_jax import teacher  # noqa: E402
from dpiqa_jax.models.attention import IMPLEMENTATIONS  # noqa: E402
from dpiqa_jax.models.dpiqa import DPIQA, TIMESTEP, TeacherConfig  # noqa: E402
from dpiqa_jax.models.student import Student  # noqa: E402
from dpiqa_jax.models.unet import REMAT, UNetFeatures  # noqa: E402
from dpiqa_jax.train import distill, exported, loop, schedule  # noqa: E402
from dpiqa_jax.train import mesh as mesh_lib  # noqa: E402
from dpiqa_jax.train import state as state_lib  # noqa: E402
from dpiqa_jax.train.config_util import load_config  # noqa: E402
from dpiqa_jax.train.step import POSTERIOR, posterior_step  # noqa: E402
from dpiqa_jax.weights.student import load_variables  # noqa: E402
from dpiqa_jax.weights.torch_names import to_state_dict  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
JOBS = {  # in the order they run
    "teacher_train": "teacher training step", "teacher_infer": "teacher inference",
    "unet": "U-Net alone (fwd+bwd+Adam)", "student_distill": "student distillation step",
    "student_infer": "student inference"}
GOALS = {"teacher_train": 3.0, "teacher_infer": 2.0, "student_distill": 2.5, "student_infer": 1.3}  # issue 7
MEMORY_GOAL = 0.7  # ours / baseline, peak memory of the teacher's training step (issue 7)
BASELINE_LR = {"teacher": 1e-5, "student": 1e-4}  # the authors' Adam (SPEC.md)
# Teacher keys the forward pass never reads: our tree lacks them, the PyTorch model keeps its own.
UNUSED = ("vae.decoder.", "vae.post_quant_conv.", "unet.conv_norm_out.", "unet.conv_out.", "QFD.bnc1.",
          "QFD.classifier_dist.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="the demo's tiny teacher and student at 64 px (configs/demo.py, student_demo.py)")
    p.add_argument("--batch", type=int, default=16, help="images per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps per job")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS), help="a subset of the jobs")
    p.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="our compute dtype, params stay float32 (default: the config's)")
    p.add_argument("--remat", choices=REMAT, help="what the U-Net's layers keep for the backward pass "
                                                 "(model.remat; default: the config's, off)")
    p.add_argument("--attention", choices=IMPLEMENTATIONS, default="auto",
                   help="our U-Net's attention kernel (model.attention)")
    p.add_argument("--cache-posteriors", choices=("on", "off"),
                   help="the teacher and distillation steps read cached VAE posteriors "
                        "(model.cache_posteriors; default: the configs': on)")
    p.add_argument("--baseline-amp", choices=("auto", "fp16", "bf16", "off"), default="auto",
                   help="the baseline's autocast: auto = fp16 (+ GradScaler) on CUDA, off (fp32) on the CPU")
    p.add_argument("--no-baseline", action="store_true", help="ours alone (torch is not imported)")
    p.add_argument("--output", help="write the results as JSON here")
    p.add_argument("--profile", metavar="DIR",
                   help="after each of our jobs' timed steps, trace as many more with JAX's profiler into "
                        "DIR/JOB and print where their device time goes (profile_top.py; DIR/JOB.md)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    jobs = [job for job in JOBS if job in args.jobs]
    start = time.perf_counter()
    # JAX's backend starts before torch is imported, so that JAX loads the CUDA libraries it checks
    # (cuDNN's version) and torch, which does not check, shares them.
    jax.devices()
    run = None if args.no_baseline else TorchRun.create(args)
    setup = build_setup(args, jobs, run)
    print(f"setup (configs, weights, batch) {time.perf_counter() - start:.0f} s", file=sys.stderr)
    baseline = {} if run is None else run_side(BASELINE, setup, args, jobs, run)
    ours = run_side(OURS, setup, args, jobs)
    report = make_report(args, setup, jobs, ours, baseline, run)
    print(table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    failed = [f"{side} {row['job']}" for row in report["jobs"] for side in ("ours", "baseline")
              if row[side] and row[side].get("error")]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# What both sides share: configs, weights (host copies) and the batch.

@dataclasses.dataclass
class Setup:
    teacher_config: ml_collections.ConfigDict
    student_config: ml_collections.ConfigDict
    task: loop.Task
    teacher_cfg: TeacherConfig
    teacher_params: Optional[dict]  # numpy (random_weights); None when no job needs them
    student: Student
    student_vars: Optional[dict]  # numpy {'params', 'batch_stats'}
    images: np.ndarray  # (B, S, S, 3) in [0, 1]
    targets: np.ndarray  # (B,)
    latents: np.ndarray  # (B, s, s, 4): the U-Net's input in its job

    @property
    def embeddings(self) -> np.ndarray:
        return self.task.embeddings


def load_configs(args):
    """(teacher config, student config): the demo's for --tiny, else the authors' (SD-1.5, B7)."""
    names = ("demo.py", "student_demo.py") if args.tiny else ("default.py", "student_koniq10k.py")
    configs = [load_config(str(REPO / "configs" / name)) for name in names]
    teacher, student = configs
    for config in configs:
        config.seed = args.seed
        config.model.embeddings = None  # random weights, no files
        config.model.dtype = args.dtype or config.model.dtype
        config.model.attention = args.attention
        if args.cache_posteriors:
            config.model.cache_posteriors = args.cache_posteriors == "on"
    teacher.model.sd_dir = teacher.model.init_from = None
    teacher.model.remat = args.remat or teacher.model.remat
    student.student.imagenet = None
    student.student.cache_teacher = False  # the job times the teacher's forward pass in the step
    return configs


def build_setup(args, jobs, run: Optional["TorchRun"]) -> Setup:
    teacher_config, student_config = load_configs(args)
    task = loop.teacher_task(teacher_config)
    cfg = teacher.teacher_config_from_dict(task.model_dict)
    rng = np.random.default_rng(args.seed)
    images = rng.random((args.batch, cfg.image_size, cfg.image_size, 3), dtype=np.float32)
    latents = rng.standard_normal((args.batch, cfg.latent_size, cfg.latent_size, 4), dtype=np.float32)
    spec = distill.student_spec(student_config, cfg.image_size)
    depth, dtype = student_config.student.stochastic_depth_prob, jnp.dtype(student_config.model.dtype)
    student = Student(spec.variant, spec.map_channels, spec.fc_width, depth, dtype=dtype)  # as student_task's
    teacher_params = student_vars = None
    if set(jobs) & {"teacher_train", "teacher_infer", "unet", "student_distill"}:
        teacher_params = random_weights(task.param_shapes, rng)
    if set(jobs) & {"student_distill", "student_infer"}:
        student_vars = random_weights(spec.variable_shapes(), rng)
        if run is not None and "student_infer" in jobs:
            student_vars = fit_batch_stats(student, cfg.latent_size, student_vars, images, run)
    return Setup(teacher_config, student_config, task, cfg, teacher_params, student, student_vars, images,
                 rng.random(args.batch, dtype=np.float32), latents)


def random_weights(shapes, rng: np.random.Generator) -> dict:
    """Both sides' weights, drawn on the host as the tests' oracle draws them (tests/oracle.py):
    every parameter perturbed, so that the parity check covers each one (the trainer's init leaves
    biases at 0, norm scales at 1 and gamma at 1e-4, where a mapping bug would not show), and no init
    to compile (half a minute for the tiny teacher on a CPU). Batch statistics keep the init's."""
    def draw(path, spec):
        leaf = str(getattr(path[-1], "key", path[-1]))
        if leaf in ("mean", "var"):
            return np.full(spec.shape, 0.0 if leaf == "mean" else 1.0, np.float32)
        x = rng.standard_normal(spec.shape, dtype=np.float32)
        if len(spec.shape) == 1:
            return 1 + 0.1 * x if leaf == "scale" else 0.1 * x
        x /= np.sqrt(np.prod(spec.shape[:-1]))  # fan-in of a kernel, HWIO or (in, out)
        return x

    return jax.tree_util.tree_map_with_path(draw, shapes)


def fit_batch_stats(student: Student, map_size: int, variables: dict, images: np.ndarray, run) -> dict:
    """`variables` with each norm's running statistics set to the statistics of its input on `images`.
    With the init's (mean 0, variance 1) random activations fade through the EfficientNet's blocks
    until every score is ~1e-9, and the parity check would compare zeros. Fitted in PyTorch, eagerly:
    a JAX pass would cost one more compile."""
    import torch

    model = torch_student(student, map_size, variables, run).eval()

    def fit(norm, inputs):
        var, mean = torch.var_mean(inputs[0], dim=(0, 2, 3), unbiased=False)
        norm.running_mean.copy_(mean)
        norm.running_var.copy_(var)

    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [norm.register_forward_pre_hook(fit) for norm in norms]
    with torch.no_grad():  # each norm's statistics are set just before it runs, on its actual input
        model(run.tensor(images.transpose(0, 3, 1, 2)))
    for hook in hooks:
        hook.remove()
    state = {k: v.cpu().numpy() for k, v in model.state_dict().items()}
    return load_variables(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables), state)


# ----------------------------------------------------------------------------------------------
# Running and timing.

def run_side(functions: dict, setup: Setup, args, jobs, run: Optional["TorchRun"] = None) -> dict:
    """{job: result} of ours, or of the baseline with `run`; a job that fails records its error and
    the others still run."""
    results = {}
    for job in jobs:
        _release(run)
        try:
            if run is None:
                trace_dir = Path(args.profile) / job if args.profile else None
                results[job] = functions[job](setup, argparse.Namespace(**vars(args), trace_dir=trace_dir))
            else:
                results[job] = functions[job](setup, args, run)
        except Exception as e:  # e.g. out of memory: report it, measure the other jobs
            traceback.print_exc()
            results[job] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(f"{'ours' if run is None else 'baseline'} {job}: {summary(results[job])}", file=sys.stderr)
    _release(run)  # what PyTorch cached goes back to the device, for our jobs
    return results


def _release(run: Optional["TorchRun"]) -> None:
    """Frees the previous job's arrays and modules (and PyTorch's cache, and resets its peak)."""
    gc.collect()
    if run is not None:
        run.release()


def summary(result: dict) -> str:
    if "error" in result:
        return result["error"]
    compile_s = f", compile {result['compile_s']:.1f} s" if "compile_s" in result else ""
    return f"{result['images_per_s']:.2f} images/s{compile_s}"


def measure(once: Callable, wait: Callable, args) -> tuple[float, Any]:
    """(images/s over args.steps calls of `once` after args.warmup, the last call's output). `wait`
    blocks until an output is computed; dispatch stays asynchronous between the timed steps. Where
    `args.trace_dir` is set (ours, with --profile), as many calls again under JAX's profiler."""
    out = None
    for _ in range(args.warmup):
        out = once()
    wait(out)
    start = time.perf_counter()
    for _ in range(args.steps):
        out = once()
    wait(out)
    images_per_s = args.batch * args.steps / (time.perf_counter() - start)
    if getattr(args, "trace_dir", None):
        with jax.profiler.trace(str(args.trace_dir), create_perfetto_trace=True):
            start = time.perf_counter()
            for _ in range(args.steps):
                out = once()
            wait(out)
            wall_s = time.perf_counter() - start
        where = profile_top.report(str(args.trace_dir), args.steps, wall_s=wall_s)
        Path(f"{args.trace_dir}.md").write_text(where + "\n")
        print(f"{args.trace_dir.name}, where the device time goes:\n{where}", file=sys.stderr)
    return images_per_s, out


def aot_compile(step, *example):
    """(compiled step, seconds to trace, lower and compile it)."""
    start = time.perf_counter()
    compiled = step.lower(*example).compile()
    return compiled, time.perf_counter() - start


def measure_train_step(compiled, state, inputs: tuple, args) -> float:
    """images/s of a compiled train step `compiled(state, *inputs) -> (state, metrics)` that donates
    its state: each call takes the state the previous call returned."""
    carry = [state]
    del state  # donated to the first call

    def once():
        carry[0], metrics = compiled(carry[0], *inputs)
        return carry[0], metrics

    return measure(once, jax.block_until_ready, args)[0]


def jax_result(images_per_s: float, compile_s: float, compiled) -> dict:
    """Our figures: the device's peak so far (None where JAX keeps no statistics, e.g. the CPU) and
    what XLA planned for the step alone (arguments + outputs - donated + temporaries)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    plan = compiled.memory_analysis()
    planned = None if plan is None else (plan.argument_size_in_bytes + plan.output_size_in_bytes
                                         - plan.alias_size_in_bytes + plan.temp_size_in_bytes)
    return {"images_per_s": images_per_s, "compile_s": compile_s,
            "peak_bytes": stats.get("peak_bytes_in_use"), "planned_bytes": planned}


# ----------------------------------------------------------------------------------------------
# Ours: the trainer's own steps.

def optimizer(config: ml_collections.ConfigDict):
    """The trainer's Adam and schedule (the schedule's epoch length does not change the step's cost)."""
    return schedule.optimizer(config.optim, schedule.learning_rate(config.optim, 1000, 1000))


def layout(params, tx, mesh):
    """The trainer's state shardings (FSDP as configured) for `params`."""
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return state_lib.layout(shapes, tx, mesh)[1]


def place_batch(setup: Setup, mesh, evaluation: bool = False, extra: Optional[dict] = None) -> dict:
    """The batch as the trainer's input pipeline hands it over: split over every device."""
    n = len(setup.images)
    batch = {"image": setup.images, "target": setup.targets, "index": np.arange(n, dtype=np.int32),
             **(extra or {})}
    if evaluation:
        batch["mask"] = np.ones(n, np.float32)
    split = mesh_lib.batch_sharding(mesh)
    return state_lib.place(batch, {key: split for key in batch})


def cached_posteriors(setup: Setup, config: ml_collections.ConfigDict, teacher_params, mesh) -> dict:
    """With `model.cache_posteriors` the trainer's batches (the teacher's and distillation's) carry
    the VAE posteriors (float32), computed once before training (`loop.posterior_join`); here too,
    so that the step is the trainer's."""
    if not config.model.cache_posteriors:
        return {}
    model = DPIQA(setup.teacher_cfg, dtype=jnp.dtype(config.model.dtype))
    out = jax.jit(functools.partial(posterior_step, model=model))(
        teacher_params, place_batch(setup, mesh, evaluation=True))
    return {key: np.asarray(out[key], np.float32) for key in POSTERIOR}


def ours_teacher_train(setup: Setup, args) -> dict:
    config = setup.teacher_config
    mesh, tx = mesh_lib.make_mesh(config.mesh.fsdp), optimizer(config)
    shardings = layout(setup.teacher_params, tx, mesh)
    state = state_lib.create_state(setup.teacher_params, tx, jax.random.PRNGKey(config.seed), shardings)
    train_step, _, embeddings = setup.task.compile_steps(tx, mesh, shardings)
    batch = place_batch(setup, mesh, extra=cached_posteriors(setup, config, state.full_params(), mesh))
    # As the trainer: the stored program where JAX's compilation cache is on (JAX_COMPILATION_CACHE_DIR)
    start = time.perf_counter()
    identity = {"benchmark": "teacher_train", "config": config.to_json_best_effort(sort_keys=True)}
    step = exported.train_step(train_step, (state, batch, embeddings), identity, mesh, exported.default_dir())
    compiled, _ = aot_compile(step, state, batch, embeddings)
    compile_s = time.perf_counter() - start
    return jax_result(measure_train_step(step, state, (batch, embeddings), args), compile_s, compiled)


def ours_teacher_infer(setup: Setup, args) -> dict:
    config = setup.teacher_config
    mesh, tx = mesh_lib.make_mesh(config.mesh.fsdp), optimizer(config)
    shardings = layout(setup.teacher_params, tx, mesh)
    _, eval_step, embeddings = setup.task.compile_steps(tx, mesh, shardings)
    params = state_lib.place(setup.teacher_params, shardings.full_params())
    batch, key = place_batch(setup, mesh, evaluation=True), jax.random.PRNGKey(config.seed)
    compiled, compile_s = aot_compile(eval_step, params, batch, embeddings, key)
    images_per_s, out = measure(lambda: compiled(params, batch, embeddings, key), jax.block_until_ready, args)
    return jax_result(images_per_s, compile_s, compiled) | {"scores": np.asarray(out["score"]).tolist()}


def unet_step(params, opt_state, latents, context, *, unet: UNetFeatures, tx):
    """The U-Net alone as the teacher runs it (t = 1, the prompt context shared by the batch), trained
    on the mean square of its up blocks' outputs."""
    def loss_fn(p):
        features = unet.apply({"params": p}, latents, jnp.full((latents.shape[0],), TIMESTEP, jnp.float32),
                              context)
        return sum(jnp.mean(f.astype(jnp.float32) ** 2) for f in features)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def ours_unet(setup: Setup, args) -> dict:
    config = setup.teacher_config
    unet = UNetFeatures(setup.teacher_cfg.unet, dtype=jnp.dtype(config.model.dtype), remat=config.model.remat,
                        attention=config.model.attention)
    tx = optimizer(config)
    params = jax.device_put(setup.teacher_params["unet"])
    opt_state = jax.jit(tx.init)(params)
    latents, context = jax.device_put(setup.latents), jax.device_put(setup.embeddings[None])
    step = jax.jit(functools.partial(unet_step, unet=unet, tx=tx), donate_argnums=(0, 1))
    compiled, compile_s = aot_compile(step, params, opt_state, latents, context)
    carry = [params, opt_state]
    del params, opt_state  # donated to the first step

    def once():
        carry[0], carry[1], loss = compiled(carry[0], carry[1], latents, context)
        return carry, loss

    images_per_s, _ = measure(once, jax.block_until_ready, args)
    return jax_result(images_per_s, compile_s, compiled)


def ours_student_distill(setup: Setup, args) -> dict:
    config = setup.student_config
    mesh, tx = mesh_lib.make_mesh(config.mesh.fsdp), optimizer(config)
    shardings = layout(setup.student_vars, tx, mesh)
    state = state_lib.create_state(setup.student_vars, tx, jax.random.PRNGKey(config.seed), shardings)
    # The teacher's inputs placed as distill.student_task's compile_steps places them (that task
    # loads its teacher from a checkpoint on disk; here the teacher's weights are in memory).
    input_shardings = {"teacher": mesh_lib.state_shardings(mesh, setup.teacher_params),
                       "embeddings": mesh_lib.replicated(mesh)}
    inputs = state_lib.place({"teacher": setup.teacher_params, "embeddings": setup.embeddings},
                             input_shardings)
    teacher_model = DPIQA(setup.teacher_cfg, dtype=jnp.dtype(config.model.dtype),
                          attention=config.model.attention)
    train_step, _ = distill.compile_distill_steps(setup.student, teacher_model, tx, mesh, shardings,
                                                  input_shardings, latent_mode=config.model.latents,
                                                  map_weight=config.loss.map_weight)
    batch = place_batch(setup, mesh, extra=cached_posteriors(setup, config, inputs["teacher"], mesh))
    compiled, compile_s = aot_compile(train_step, state, batch, inputs)
    return jax_result(measure_train_step(compiled, state, (batch, inputs), args), compile_s, compiled)


def ours_student_infer(setup: Setup, args) -> dict:
    mesh = mesh_lib.make_mesh(setup.student_config.mesh.fsdp)
    shardings = mesh_lib.state_shardings(mesh, setup.student_vars)
    variables = state_lib.place(setup.student_vars, shardings)
    step = distill.compile_student_eval_step(setup.student, mesh, shardings)
    batch, key = place_batch(setup, mesh, evaluation=True), jax.random.PRNGKey(0)
    compiled, compile_s = aot_compile(step, variables, batch, None, key)
    images_per_s, out = measure(lambda: compiled(variables, batch, None, key), jax.block_until_ready, args)
    return jax_result(images_per_s, compile_s, compiled) | {"scores": np.asarray(out["score"]).tolist()}


OURS = {"teacher_train": ours_teacher_train, "teacher_infer": ours_teacher_infer, "unet": ours_unet,
        "student_distill": ours_student_distill, "student_infer": ours_student_infer}


# ----------------------------------------------------------------------------------------------
# The baseline: the authors' PyTorch way. torch is imported here only.

@dataclasses.dataclass
class TorchRun:
    """The baseline's device and mixed precision, and its per-job memory statistics."""

    device: Any
    amp: Any  # the autocast dtype, or None for float32

    @classmethod
    def create(cls, args) -> "TorchRun":
        import torch

        # torch_reference.py is the tests' PyTorch rendering of the authors' model (a plain module,
        # not a test): the baseline is built from it, so that it is the model the parity tests check.
        sys.path.insert(0, str(REPO / "tests"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        mode = args.baseline_amp
        if mode == "auto":
            mode = "fp16" if device.type == "cuda" else "off"
        return cls(device, {"fp16": torch.float16, "bf16": torch.bfloat16, "off": None}[mode])

    def autocast(self):
        import torch

        if self.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    def scaler(self):
        """The authors' loss scaling, which fp16 needs (bfloat16 and float32 do not)."""
        import torch

        return torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

    def tensor(self, array: np.ndarray):
        import torch

        return torch.from_numpy(np.array(array)).to(self.device)

    def wait(self, _out=None) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def release(self) -> None:
        """The finished jobs' cached memory back to the device, the peak reset."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def precision(self) -> str:
        return "float32" if self.amp is None else f"{str(self.amp).removeprefix('torch.')} autocast"

    def result(self, images_per_s: float) -> dict:
        import torch

        peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else None
        return {"images_per_s": images_per_s, "peak_bytes": peak}


def diffusers_configs(cfg: TeacherConfig) -> tuple[dict, dict]:
    """(UNet2DConditionModel, AutoencoderKL) keyword arguments of our teacher's U-Net and VAE."""
    unet = dataclasses.asdict(cfg.unet) | {"sample_size": cfg.latent_size}
    n = len(cfg.vae.block_out_channels)
    vae = dataclasses.asdict(cfg.vae) | {"down_block_types": ("DownEncoderBlock2D",) * n,
                                         "up_block_types": ("UpDecoderBlock2D",) * n}
    return unet, vae


def load_weights(module, state: dict, unused: Callable[[str], bool]) -> None:
    """Our weights (PyTorch names) into `module`; only keys that `unused` accepts may stay its own."""
    import torch

    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}  # np.array: a writable copy
    result = module.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if not unused(k)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"weights do not fit the PyTorch model: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")


def torch_teacher(setup: Setup, run: TorchRun):
    import torch
    from torch_reference import build_torch_dpiqa

    unet_config, vae_config = diffusers_configs(setup.teacher_cfg)
    with torch.device(run.device):  # built on the device: a CPU init of 1 B parameters takes long
        model = build_torch_dpiqa(unet_config, vae_config, dict(setup.teacher_cfg.decoder),
                                  adapter_res_blocks=setup.teacher_cfg.adapter_res_blocks)
    load_weights(model, to_state_dict(setup.teacher_params), lambda k: k.startswith(UNUSED))
    return model


def torch_student(student: Student, map_size: int, variables: dict, run: TorchRun):
    import torch
    from torch_reference import TorchStudent

    with torch.device(run.device):
        model = TorchStudent(student.variant, map_size=map_size, fc_width=student.fc_width)
    state = {**to_state_dict(variables["params"]), **to_state_dict(variables["batch_stats"])}
    load_weights(model, state, lambda k: k.endswith("num_batches_tracked"))
    return model


def torch_inputs(setup: Setup, run: TorchRun):
    """(images NCHW, prompt embeddings, targets) on the baseline's device."""
    images = setup.images.transpose(0, 3, 1, 2)
    return run.tensor(images), run.tensor(setup.embeddings), run.tensor(setup.targets)


def train_once(model_params, loss_fn: Callable, lr: float, run: TorchRun) -> Callable:
    """One step of the authors' training: Adam, autocast, loss scaling."""
    import torch

    optimizer, scaler = torch.optim.Adam(model_params, lr=lr), run.scaler()

    def once():
        optimizer.zero_grad(set_to_none=True)
        with run.autocast():
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return once


def baseline_teacher_train(setup: Setup, args, run: TorchRun) -> dict:
    import torch.nn.functional as F

    model = torch_teacher(setup, run).train()
    x, prompts, target = torch_inputs(setup, run)
    latent = setup.teacher_config.model.latents

    def loss_fn():
        score, _ = model(x, prompts, latent=latent)
        return F.mse_loss(score[:, 0].float(), target)

    trained = [p for p in model.parameters() if p.requires_grad]  # all but the VAE
    once = train_once(trained, loss_fn, BASELINE_LR["teacher"], run)
    return run.result(measure(once, run.wait, args)[0])


def infer_once(model, run: TorchRun, *inputs, **kwargs) -> Callable:
    import torch

    def once():
        with torch.no_grad(), run.autocast():
            return model(*inputs, **kwargs)[0]

    return once


def baseline_teacher_infer(setup: Setup, args, run: TorchRun) -> dict:
    model = torch_teacher(setup, run).eval()
    x, prompts, _ = torch_inputs(setup, run)
    once = infer_once(model, run, x, prompts, latent=setup.teacher_config.eval.latents)
    images_per_s, score = measure(once, run.wait, args)
    return run.result(images_per_s) | {"scores": score[:, 0].float().cpu().numpy().tolist()}


def baseline_unet(setup: Setup, args, run: TorchRun) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device(run.device):
        unet = UNet2DConditionModel(**diffusers_configs(setup.teacher_cfg)[0]).train()
    state = {k[len("unet."):]: v for k, v in to_state_dict({"unet": setup.teacher_params["unet"]}).items()}
    load_weights(unet, state, lambda k: k.startswith(("conv_norm_out.", "conv_out.")))
    latents = run.tensor(setup.latents.transpose(0, 3, 1, 2))
    context = run.tensor(setup.embeddings)[None].expand(len(setup.latents), -1, -1)  # as the authors

    def loss_fn():  # diffusers' U-Net returns its output head's result, our U-Net its up blocks'
        return unet(latents, TIMESTEP, encoder_hidden_states=context).sample.float().pow(2).mean()

    once = train_once(unet.parameters(), loss_fn, BASELINE_LR["teacher"], run)
    return run.result(measure(once, run.wait, args)[0])


def baseline_student_distill(setup: Setup, args, run: TorchRun) -> dict:
    import torch
    import torch.nn.functional as F

    teacher_model = torch_teacher(setup, run).eval()
    student = torch_student(setup.student, setup.teacher_cfg.latent_size, setup.student_vars, run).train()
    x, prompts, target = torch_inputs(setup, run)
    config = setup.student_config

    def loss_fn():
        with torch.no_grad():
            _, teacher_map = teacher_model(x, prompts, latent=config.model.latents)
        score, fmap = student(x)
        return (F.mse_loss(score[:, 0].float(), target)
                + config.loss.map_weight * F.mse_loss(fmap.float(), teacher_map.float()))

    once = train_once(student.parameters(), loss_fn, BASELINE_LR["student"], run)
    return run.result(measure(once, run.wait, args)[0])


def baseline_student_infer(setup: Setup, args, run: TorchRun) -> dict:
    x, _, _ = torch_inputs(setup, run)
    student = torch_student(setup.student, setup.teacher_cfg.latent_size, setup.student_vars, run).eval()
    images_per_s, score = measure(infer_once(student, run, x), run.wait, args)
    return run.result(images_per_s) | {"scores": score[:, 0].float().cpu().numpy().tolist()}


BASELINE = {"teacher_train": baseline_teacher_train, "teacher_infer": baseline_teacher_infer,
            "unet": baseline_unet, "student_distill": baseline_student_distill,
            "student_infer": baseline_student_infer}


# ----------------------------------------------------------------------------------------------
# The report.

def rel_diff(ours: dict, baseline: dict) -> Optional[float]:
    """|ours - baseline| / |baseline| of the scores (L2 over the batch), where both sides have them."""
    if "scores" not in ours or "scores" not in baseline:
        return None
    a, b = np.asarray(ours["scores"], np.float64), np.asarray(baseline["scores"], np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ratio(a: dict, b: dict, key: str) -> Optional[float]:
    return a[key] / b[key] if a and b and a.get(key) and b.get(key) else None


def make_report(args, setup: Setup, jobs, ours: dict, baseline: dict, run: Optional[TorchRun]) -> dict:
    rows = [{"job": job, "title": JOBS[job], "goal": GOALS.get(job), "ours": ours[job],
             "baseline": baseline.get(job), "ratio": ratio(ours[job], baseline.get(job), "images_per_s"),
             "memory_ratio": ratio(ours[job], baseline.get(job), "peak_bytes"),
             "score_rel_diff": rel_diff(ours[job], baseline.get(job) or {})} for job in jobs]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_names(args), "versions": versions(args), "tiny": args.tiny,
            "batch": args.batch, "image_size": setup.teacher_cfg.image_size, "dtype": {
                "ours": setup.teacher_config.model.dtype, "ours_params": "float32",
                "baseline": run and run.precision()},
            "remat": setup.teacher_config.model.remat, "attention": args.attention, "steps": args.steps,
            "warmup": args.warmup,
            "cached_posteriors": setup.teacher_config.model.cache_posteriors,
            "memory_goal": MEMORY_GOAL, "jobs": rows}


def device_names(args) -> dict:
    names = {"jax": jax.local_devices()[0].device_kind, "jax_count": jax.device_count()}
    if not args.no_baseline:
        import torch

        names["torch"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return names


def versions(args) -> dict:
    packages = ["jax", "jaxlib", "flax", "optax"] + ([] if args.no_baseline else ["torch", "torchvision",
                                                                                    "diffusers"])
    return {"python": platform.python_version(), **{p: metadata.version(p) for p in packages}}


def table(report: dict) -> str:
    gib = lambda side: (f"{side['peak_bytes'] / 2**30:.2f}" if side and side.get("peak_bytes") is not None  # noqa: E731
                        else "n/a")
    num = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    device, dtype = report["device"], report["dtype"]
    baseline = f"baseline {dtype['baseline']} on {device['torch']}" if dtype["baseline"] else "no baseline"
    lines = [f"DP-IQA speed, batch {report['batch']}, {report['image_size']} px, {report['steps']} steps "
             f"after {report['warmup']} warm-up; ours {dtype['ours']} (float32 params) on {device['jax']}, "
             f"{baseline}; VAE posteriors {'cached' if report['cached_posteriors'] else 'in the step'}; "
             f"remat {report['remat']}; "
             f"{report['date']}", "",
             "| job | ours images/s | baseline images/s | ratio | goal | ours peak GiB | baseline peak GiB "
             "| ours compile s | score rel diff |", "|" + " --- |" * 9]
    for row in report["jobs"]:
        ours, base = row["ours"], row["baseline"] or {}
        goal = f">= {row['goal']}x" if row["goal"] else ""
        lines.append(f"| {row['title']} | {num(ours.get('images_per_s'), '.2f')} | "
                     f"{num(base.get('images_per_s'), '.2f')} | {num(row['ratio'], '.2f')} | {goal} | "
                     f"{gib(ours)} | {gib(base)} | {num(ours.get('compile_s'), '.1f')} | "
                     f"{num(row['score_rel_diff'], '.1e')} |")
    teacher_row = next((r for r in report["jobs"] if r["job"] == "teacher_train"), None)
    if teacher_row and teacher_row["memory_ratio"] is not None:
        lines.append(f"\nPeak memory of the teacher's training step, ours / baseline: "
                     f"{teacher_row['memory_ratio']:.2f} (goal <= {MEMORY_GOAL}).")
    lines.append("Ours' peak is the process's at the end of the job (JAX cannot reset it); "
                 "n/a: the device keeps no statistics.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
