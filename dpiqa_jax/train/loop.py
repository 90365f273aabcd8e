"""`train_and_evaluate(config, workdir)`: the teacher's training loop, resumable, on any mesh.

Every `log_every` steps (and before any evaluation or checkpoint) the window's step metrics are
fetched and checked: a non-finite loss or gradient stops the run there, before anything of that
state is saved. Every `eval.every` steps and at the end the test split is scored; the best
evaluations by SRCC and PLCC are kept as checkpoints, the latest state every `checkpoint.every`
and at a SIGTERM (see `preemption`), after which the run stops with `Preempted`.
"""
import concurrent.futures
import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpiqa_jax import teacher
from dpiqa_jax.checkpoints import MODEL_FILE, with_shardings
from dpiqa_jax.errors import UserError
from dpiqa_jax.models.attention import IMPLEMENTATIONS
from dpiqa_jax.models.dpiqa import DPIQA, TeacherConfig
from dpiqa_jax.models.unet import REMAT
from dpiqa_jax.train import checkpoint as ckpt_lib
from dpiqa_jax.train import evaluator, example_cache, exported, inputs, metrics, preemption, report, schedule
from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train import state as state_lib
from dpiqa_jax.train.config_util import (
    has,
    require_at_least,
    require_choice,
    require_existing,
    require_folder,
)
from dpiqa_jax.train.step import LATENTS, POSTERIOR, compile_eval_step, compile_train_step, posterior_step

BEST = {"best_srcc": "srcc", "best_plcc": "plcc"}
# The config groups that the train steps are built from (the teacher's: model, optim, loss; the
# student's also student); the rest (data, evaluation, checkpoints, logging, seed, cache folder)
# changes what the step is given, never the step.
STEP_GROUPS = ("model", "optim", "loss", "student")
# Their keys that name weight files: the weights are the step's arguments, their shapes in its key
# and the architecture in the model's description, so another file of the same model (a moved SD
# folder, another checkpoint to fine-tune) finds the same program.
WEIGHT_FILES = ("sd_dir", "embeddings", "init_from", "imagenet")
EVAL_SEED = 0x5EED  # eval draws ('sample' latents) use fold_in(PRNGKey(seed), EVAL_SEED), then the batch


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN or infinite: the run stops without saving that state."""


def validate(config: ml_collections.ConfigDict) -> None:
    """Config checks that need no data and no compile: choices and paths (of the keys the config
    has: student configs lack the teacher-training ones)."""
    choices = {"model.latents": LATENTS, "eval.latents": LATENTS, "model.dtype": ("float32", "bfloat16"),
               "model.attention": IMPLEMENTATIONS, "model.remat": REMAT, "optim.schedule": ("step", "cosine")}
    for key, allowed in choices.items():
        if has(config, key):
            require_choice(config, key, allowed)
    counts = {"batch_size": 1, "eval.batch_size": 1, "epochs": 1, "num_steps": 0, "log_every": 1,
              "eval.every": 1, "checkpoint.every": 1, "mesh.fsdp": 1}
    for key, minimum in counts.items():
        if has(config, key):
            require_at_least(config, key, minimum)
    for key in ("model.sd_dir", "model.embeddings", "model.init_from", "dataset.manual_dir"):
        if has(config, key):
            require_existing(config, key)
    require_folder(config, "cache_dir")


def prompt_embeddings(config: ml_collections.ConfigDict, embed_dim: int) -> np.ndarray:
    """The file of `model.embeddings`, else the fixed random demo matrix."""
    if not config.model.embeddings:
        return teacher.demo_prompt_embeddings(config.model.num_prompts, embed_dim, config.seed)
    from dpiqa_jax.prompts import load_prompt_embeddings

    embeddings = np.asarray(load_prompt_embeddings(config.model.embeddings), np.float32)
    if embeddings.shape[1] != embed_dim:
        raise UserError(f"config key 'model.embeddings': {config.model.embeddings} holds "
                        f"{embeddings.shape[1]}-d embeddings; the U-Net's cross_attention_dim is {embed_dim}")
    return embeddings


@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop trains: the model's description, its parameters and its pure steps."""

    model_file: str  # the JSON in the workdir that describes the model (e.g. model.json)
    model_dict: dict
    embeddings: Optional[np.ndarray]  # the prompt matrix, written beside it (teachers)
    image_size: int
    param_shapes: Any  # the full parameter tree (trainable and frozen) as ShapeDtypeStructs
    init_params: Callable[[], Any]
    # (tx, mesh, state shardings) -> (train step, eval step, the steps' extra input placed on the mesh)
    compile_steps: Callable
    # (data, cache root (`cache_root`), state, the steps' extra input) -> a function that adds fields
    # to each host-local train batch (cached outputs of frozen parts), or None; called once before training
    batch_join: Optional[Callable] = None
    joined: dict = dataclasses.field(default_factory=dict)  # float32 fields batch_join adds: name -> shape
    # what the steps close over beyond the config and model_dict (a student's teacher), as JSON
    closes_over: dict = dataclasses.field(default_factory=dict)


def teacher_task(config: ml_collections.ConfigDict) -> Task:
    if config.model.init_from:  # fine-tuning: the checkpoint's architecture, weights and prompts
        model_cfg, start, embeddings = teacher.load_teacher(config.model.init_from, config.model.embeddings)
        init_params = lambda: start
    else:
        model_cfg = teacher.teacher_config_from_dict(config.model.arch.to_dict())
        embeddings = prompt_embeddings(config, model_cfg.embed_dim)

        def init_params():
            return teacher.init_teacher_params(model_cfg, config.seed, config.model.sd_dir)

    model = DPIQA(model_cfg, dtype=jnp.dtype(config.model.dtype), remat=config.model.remat,
                  attention=config.model.attention)

    def compile_steps(tx, mesh, shardings):
        train_step = compile_train_step(model, tx, mesh, shardings, latent_mode=config.model.latents,
                                        rank_weight=config.loss.rank_weight)
        eval_step = compile_eval_step(model, mesh, shardings.full_params(), latent_mode=config.eval.latents)
        return train_step, eval_step, state_lib.place(embeddings, mesh_lib.replicated(mesh))

    def cached_posteriors(data, root: str, state, _embeddings):
        return posterior_join(data, root, model, state.full_params())

    cache = config.model.cache_posteriors
    join, joined = (cached_posteriors, posterior_shapes(model_cfg)) if cache else (None, {})
    return Task(MODEL_FILE, teacher.teacher_config_to_dict(model_cfg), embeddings, model_cfg.image_size,
                teacher.param_shapes(model_cfg), init_params, compile_steps, join, joined)


def posterior_shapes(cfg: TeacherConfig) -> dict[str, tuple]:
    """The cached posterior's fields (`POSTERIOR`) and one image's shape of each."""
    side = cfg.latent_size
    return dict.fromkeys(POSTERIOR, (side, side, cfg.vae.latent_channels))


def posterior_join(data, root: str, model: DPIQA, params: dict) -> Callable[[dict], dict]:
    """The join of the train images' VAE posteriors (`model`'s VAE with `params['vae']`), from the
    cache under `root` or one pass of the frozen VAE: the teacher's train step and the distillation
    step then draw their latents from the batch's posteriors instead of running the VAE."""
    identity = {"vae": example_cache.params_digest(params["vae"]), "dtype": jnp.dtype(model.dtype).name}
    return example_cache.join_from_pass(root, "vae_posteriors", data,
                                        functools.partial(posterior_step, model=model), params,
                                        posterior_shapes(model.config), identity)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Optional[Task] = None) -> dict:
    """Trains (or resumes) the run in `workdir` (the teacher unless `task` says otherwise); returns
    the contents of its results.json."""
    validate(config)
    with ckpt_lib.workdir_lock(workdir):
        return _train_and_evaluate(config, workdir, task)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, task: Optional[Task]) -> dict:
    mesh = mesh_lib.make_mesh(config.mesh.fsdp)
    task = task or teacher_task(config)
    data = inputs.IQAData(config, task.image_size, mesh)
    ckpt_lib.write_model_files(workdir, task.model_file, task.model_dict, task.embeddings)

    steps_per_epoch = data.steps_per_epoch
    total_steps = config.num_steps or config.epochs * steps_per_epoch
    lr = schedule.learning_rate(config.optim, steps_per_epoch, total_steps)
    tx = schedule.optimizer(config.optim, lr)
    checkpoints = ckpt_lib.RunCheckpoints(workdir, async_save=config.checkpoint.async_save)
    abstract, shardings = state_lib.layout(task.param_shapes, tx, mesh)
    train_step, eval_step, step_inputs = task.compile_steps(tx, mesh, shardings)
    latest = checkpoints.latest_step()
    if jax.process_index() == 0:
        print(report.run_line(mesh, config.batch_size, data.num_train, steps_per_epoch, total_steps, latest),
              flush=True)
    compiled = None
    if (latest or 0) < total_steps:
        args = (with_shardings(abstract, shardings), data.train_spec(task.joined), step_inputs)
        compiled = _compile_ahead(train_step, args, step_identity(config, task, steps_per_epoch, total_steps),
                                  mesh)
    state, meta = _initial_state(config, task, tx, abstract, shardings, checkpoints, latest)
    start, best = meta["data_position"], meta["best"]

    join = None
    if task.batch_join and start < total_steps:
        join = task.batch_join(data, cache_root(config, workdir), state, step_inputs)
    if compiled is not None:
        train_step = exported.agreed(compiled.result(), train_step)  # raises what compiling raised
    reporter = report.Reporter(workdir, total_steps, start, config.batch_size)
    run = _Run(config, data, reporter, checkpoints, eval_step, step_inputs, best, join)
    failing = True  # until the end: closing must not hide the error that stops the run
    try:
        with preemption.PreemptionWatch() as watch:
            state, final = run.train(state, train_step, start, total_steps, lr, steps_per_epoch, watch)
        checkpoints.wait()
        results = {"final": final, "best": {BEST[name]: meta for name, meta in run.best.items()}}
        reporter.results(results["final"], results["best"])
        failing = False
        return results
    finally:
        reporter.close()
        checkpoints.close(failing)


def cache_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the run's per-image caches go: the config's `cache_dir`, shared by runs, else the workdir."""
    return config.cache_dir or workdir


def step_identity(config: ml_collections.ConfigDict, task: Task, steps_per_epoch: int,
                  total_steps: int) -> dict:
    """All that the train step closes over beyond its arguments' shapes (the stored program's key in
    `exported`): its config groups, the model, what the task adds (a student's teacher) and the
    schedule's lengths. A run that differs elsewhere (another split, workdir, evaluation period,
    seed, weight files of the same model) finds the same program."""
    groups = {name: {key: value for key, value in config[name].to_dict().items() if key not in WEIGHT_FILES}
              for name in STEP_GROUPS if name in config}
    return {"config": groups, "model": task.model_dict, "closes_over": task.closes_over,
            "schedule": [steps_per_epoch, total_steps]}


def _compile_ahead(step, args: tuple, identity: dict, mesh) -> concurrent.futures.Future:
    """The train step to run (the stored program of `exported`, else `step`), compiled for `args`
    (shapes or arrays) on a thread of its own while this one loads the state and the caches: its
    first call then finds the executable in JAX's caches. Arguments that differ from the call's
    only cost a second compile."""
    def compile_step():
        ready = exported.train_step(step, args, identity, mesh, exported.default_dir())
        ready.lower(*args).compile()
        return ready

    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")
    future = pool.submit(compile_step)
    pool.shutdown(wait=False)
    return future


def _initial_state(config, task: Task, tx, abstract, shardings, checkpoints, latest: Optional[int]):
    """(state, meta): the latest checkpoint (step `latest`) if there is one, else a fresh start."""
    if latest is None:
        state = state_lib.create_state(task.init_params(), tx, jax.random.PRNGKey(config.seed), shardings)
        return state, {"step": 0, "data_position": 0, "best": {name: None for name in BEST}}
    abstract_params = with_shardings(abstract.full_params(), shardings.full_params())
    abstract_opt = with_shardings(abstract.opt_state, shardings.opt_state)
    params, opt_state, meta = checkpoints.restore_latest(abstract_params, abstract_opt)
    trainable, frozen = state_lib.split_params(params)
    state = state_lib.TrainState(
        step=state_lib.place(jnp.asarray(meta["step"], jnp.int32), shardings.step), params=trainable,
        frozen=frozen, opt_state=opt_state,
        rng=state_lib.place(np.asarray(meta["rng"], np.uint32), shardings.rng))
    return state, meta


class _Run:
    """The loop's moving parts; one object so that each piece of the loop is a short method."""

    def __init__(self, config, data, reporter, checkpoints, eval_step, step_inputs, best, join):
        self.config, self.data, self.reporter, self.checkpoints = config, data, reporter, checkpoints
        self.eval_step, self.step_inputs, self.best, self.join = eval_step, step_inputs, best, join
        self.pending: list[tuple[int, dict]] = []

    def train(self, state, train_step, start: int, total: int, lr, steps_per_epoch: int,
              watch: preemption.PreemptionWatch):
        cfg = self.config
        batches = self.data.train_batches(start, self.join) if start < total else None
        final: Optional[dict] = None
        for step in range(start + 1, total + 1):
            state, step_metrics = train_step(state, next(batches), self.step_inputs)
            if step == start + 1:
                jax.block_until_ready(step_metrics)
                self.reporter.first_step_done(exported.read_back(train_step))
            self.pending.append((step, step_metrics))
            self.reporter.step()
            stop = watch.reached(step)
            evaluate = step % cfg.eval.every == 0 or step == total
            save = step % cfg.checkpoint.every == 0 or step == total or stop
            if step % cfg.log_every == 0 or evaluate or save:
                self.flush(step, lr, steps_per_epoch)
            if evaluate:
                final = self.evaluate(state, step)
            if save:
                self.save_latest(state, step)
            if stop:
                self.checkpoints.wait()
                raise preemption.Preempted(f"stopped by SIGTERM after step {step}, which is saved: run the "
                                           f"same command again to resume")
        if batches is not None:
            batches.close()
        if final is None:  # resumed from the last step's checkpoint
            final = self.evaluate(state, total)
        return state, final

    def flush(self, step: int, lr, steps_per_epoch: int) -> None:
        """Fetches the window's metrics, stops on the first non-finite step, logs the window mean."""
        window = [(at, mesh_lib.host_values(values)) for at, values in self.pending]
        self.pending = []
        for at, values in window:
            if not values["is_finite"]:
                bad = [k for k in ("loss", "grad_norm") if not math.isfinite(float(values[k]))]
                self.reporter.write(at, "train", {k: float(v) for k, v in values.items()})
                self.checkpoints.wait()
                raise NonFiniteError(f"non-finite {' and '.join(bad)} at step {at}: training stopped; "
                                     f"the last good checkpoint is kept")
        names = [k for k in window[0][1] if k != "is_finite"]
        record = {k: float(np.mean([float(v[k]) for _, v in window])) for k in names}
        record.update(learning_rate=float(lr(step - 1)), epoch=step / steps_per_epoch,
                      images_per_second=self.reporter.images_per_second(step))
        self.reporter.write(step, "train", record)

    def evaluate(self, state, step: int) -> dict:
        """Scores the eval split, logs its metrics, and keeps the best checkpoints."""
        key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), EVAL_SEED)
        values, _ = evaluator.evaluate(self.eval_step, state.full_params(), self.data.eval_batches(),
                                       self.step_inputs, key)
        self.reporter.write(step, "test", values)
        for name, metric in BEST.items():
            previous = self.best[name]
            if metrics.is_better(values[metric], previous and previous["metrics"][metric]):
                self.best[name] = {"step": step, "metrics": values}
                self.checkpoints.save_best(name, step, state.full_params(), self.best[name])
        return {"step": step, "metrics": values}

    def save_latest(self, state, step: int) -> None:
        """The state with what resuming needs: RNG, data position, and the best evaluations so far."""
        meta = {"step": step, "rng": [int(x) for x in mesh_lib.host_values(state.rng)],
                "data_position": step, "best": self.best}
        self.checkpoints.save_latest(step, state.full_params(), state.opt_state, meta)
