"""Distilling the student from a frozen teacher: the teacher step's fork, trained by the same loop.

The loss is SPEC's: MSE(student score, target) + map_weight * MSE(student map, teacher map). The
teacher (params and prompt matrix) is an input of the step, never saved with the student; the
student's batch statistics ride in the state's `frozen` part, updated by the step, not by Adam.
With `student.cache_teacher` the teacher's maps of the train images are computed once
(`example_cache`) and ride in the batches as 'teacher_map'; the step then skips the teacher. Else,
with `model.cache_posteriors`, the teacher's VAE posteriors ride in the batches as for the
teacher's own training: the step skips the VAE and still draws the latents.
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dpiqa_jax import teacher
from dpiqa_jax.checkpoints import STUDENT_FILE
from dpiqa_jax.errors import UserError
from dpiqa_jax.models.dpiqa import DPIQA
from dpiqa_jax.models.init import init_key, init_without
from dpiqa_jax.models.student import Student
from dpiqa_jax.student_io import StudentSpec
from dpiqa_jax.train import example_cache
from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train import state as state_lib
from dpiqa_jax.train.config_util import require_existing
from dpiqa_jax.train.loop import Task, posterior_join, posterior_shapes
from dpiqa_jax.train.state import TrainState
from dpiqa_jax.train.step import latents, posterior, step_metrics


def teacher_outputs(teacher_model: DPIQA, inputs: dict, batch: dict, rng, latent_mode: str):
    """The frozen teacher's (score, map) of a batch (with its VAE posteriors where cached), as
    constants of the student's loss."""
    params = inputs["teacher"]
    z = latents(teacher_model, *posterior(teacher_model, params, batch), rng, latent_mode)
    score, fmap = teacher_model.apply({"params": params}, batch["image"], z, inputs["embeddings"],
                                      method="from_latents")
    return jax.lax.stop_gradient(score.astype(jnp.float32)), jax.lax.stop_gradient(fmap.astype(jnp.float32))


def distill_step(state: TrainState, batch: dict, inputs: dict, *, student: Student, teacher_model: DPIQA,
                 tx: optax.GradientTransformation, latent_mode: str = "sample", map_weight: float = 1.0):
    rng = jax.random.fold_in(state.rng, state.step)
    latent_key, drop_key = jax.random.split(rng)
    images, target = batch["image"], batch["target"].astype(jnp.float32)
    if "teacher_map" in batch:
        teacher_map = batch["teacher_map"].astype(jnp.float32)
    else:
        _, teacher_map = teacher_outputs(teacher_model, inputs, batch, latent_key, latent_mode)

    def loss_fn(params):
        (score, fmap), updates = student.apply(
            {"params": params, **state.frozen}, images, train=True, rngs={"dropout": drop_key},
            mutable=["batch_stats"])
        mse = jnp.mean((score.astype(jnp.float32) - target) ** 2)
        map_loss = jnp.mean((fmap.astype(jnp.float32) - teacher_map) ** 2)
        return mse + map_weight * map_loss, ({"mse": mse, "map_loss": map_loss}, updates)

    (loss, (parts, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params["params"])
    updates_opt, opt_state = tx.update({"params": grads}, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates_opt)
    state = state.replace(step=state.step + 1, params=params, frozen=dict(updates), opt_state=opt_state)
    return state, step_metrics(loss, parts, grads, params)


def teacher_map_step(inputs: dict, batch: dict, *, teacher_model: DPIQA) -> dict:
    """The teacher's maps of a (padded) batch with mean latents, for the cache."""
    _, fmap = teacher_outputs(teacher_model, inputs, batch, None, "mean")
    return {"teacher_map": fmap, "index": batch["index"], "mask": batch["mask"]}


def student_eval_step(variables, batch: dict, inputs, rng, *, student: Student) -> dict:
    """Eval-mode scores of a (padded) batch, with its targets, indices and mask."""
    score, _ = student.apply(variables, batch["image"], train=False)
    return {"score": score.astype(jnp.float32), "target": batch["target"], "index": batch["index"],
            "mask": batch["mask"]}


def compile_student_eval_step(student: Student, mesh: Mesh, variable_shardings, input_shardings=None):
    """`student_eval_step` jitted over `mesh`: the batch split over every device, the rest as given
    (the inputs, unused, are the distillation step's)."""
    repl = mesh_lib.replicated(mesh)
    return jax.jit(functools.partial(student_eval_step, student=student),
                   in_shardings=(variable_shardings, mesh_lib.batch_sharding(mesh), input_shardings, repl),
                   out_shardings=repl)


def compile_distill_steps(student: Student, teacher_model: DPIQA, tx, mesh: Mesh, shardings: TrainState,
                          input_shardings, *, latent_mode: str, map_weight: float):
    """(distill_step, student eval step) jitted over `mesh`: the state in its shardings and donated,
    the batch split over every device, the teacher's inputs in `input_shardings`."""
    repl, split = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
    train = functools.partial(distill_step, student=student, teacher_model=teacher_model, tx=tx,
                              latent_mode=latent_mode, map_weight=map_weight)
    return (jax.jit(train, in_shardings=(shardings, split, input_shardings), out_shardings=(shardings, repl),
                    donate_argnums=(0,)),
            compile_student_eval_step(student, mesh, shardings.full_params(), input_shardings))


def student_spec(config: ml_collections.ConfigDict, image_size: int) -> StudentSpec:
    s = config.student
    return StudentSpec(s.variant, s.map_channels, s.fc_width, image_size)


def init_student(student: Student, image_size: int, seed: int, imagenet: Optional[str] = None) -> dict:
    """The student's random init; with `imagenet` (torchvision's EfficientNet state dict) its
    `base_model` is that file's, the other parts' values the random init's all the same."""
    inputs = (init_key(seed), jnp.zeros((1, image_size, image_size, 3)))
    if not imagenet:
        return dict(jax.jit(student.init)(*inputs))
    from dpiqa_jax.weights.student import load_torchvision_efficientnet, with_base_model

    # B7 at 512 px, 2 CPU cores: the head's init alone compiles in under 1 s instead of 23
    head = init_without(student.init, ("base_model",))(*inputs)
    return with_base_model(head, load_torchvision_efficientnet(imagenet, student.variant))


def student_task(config: ml_collections.ConfigDict, teacher_checkpoint: str) -> Task:
    """The loop's Task for distilling `config.student` from the teacher at `teacher_checkpoint`
    (a workdir, an orbax checkpoint folder or the authors' .pth; see `teacher.load_teacher`)."""
    require_existing(config, "student.imagenet")
    if config.student.cache_teacher and config.model.latents != "mean":
        raise UserError("config key 'student.cache_teacher' needs the teacher's maps to be fixed: set "
                        "'model.latents' to 'mean' (or turn the cache off to draw latents every step)")
    teacher_cfg, teacher_params, embeddings = teacher.load_teacher(teacher_checkpoint,
                                                                   config.model.embeddings)
    spec = student_spec(config, teacher_cfg.image_size)
    dtype = jnp.dtype(config.model.dtype)
    teacher_model = DPIQA(teacher_cfg, dtype=dtype, attention=config.model.attention)
    student = Student(spec.variant, spec.map_channels, spec.fc_width, config.student.stochastic_depth_prob,
                      dtype=dtype)
    shapes = spec.variable_shapes()
    map_shape = jax.eval_shape(student.apply, shapes, jax.ShapeDtypeStruct(
        (1, spec.image_size, spec.image_size, 3), jnp.float32))[1].shape
    teacher_map = (1, teacher_cfg.latent_size, teacher_cfg.latent_size, 8)
    maps = {"teacher_map": teacher_map[1:]}  # what the cache adds to each example
    if map_shape != teacher_map:
        raise UserError(f"the student's feature map {map_shape[1:]} does not match the teacher's "
                        f"{teacher_map[1:]}: set config key 'student.map_channels' to 8")

    def init_params():
        return init_student(student, spec.image_size, config.seed, config.student.imagenet)

    def compile_steps(tx, mesh, shardings):
        teacher_shardings = mesh_lib.state_shardings(mesh, teacher_params)
        input_shardings = {"teacher": teacher_shardings, "embeddings": mesh_lib.replicated(mesh)}
        inputs = state_lib.place({"teacher": teacher_params, "embeddings": embeddings}, input_shardings)
        steps = compile_distill_steps(student, teacher_model, tx, mesh, shardings,
                                      input_shardings, latent_mode=config.model.latents,
                                      map_weight=config.loss.map_weight)
        return (*steps, inputs)

    def cached_maps(data, root: str, _state, inputs: dict):
        """The train images' teacher maps, from the cache under `root` or one pass of the teacher."""
        step = functools.partial(teacher_map_step, teacher_model=teacher_model)
        identity = {"teacher": example_cache.params_digest(inputs), "dtype": config.model.dtype}
        return example_cache.join_from_pass(root, "teacher_maps", data, step, inputs, maps, identity)

    def cached_posteriors(data, root: str, _state, inputs: dict):
        return posterior_join(data, root, teacher_model, inputs["teacher"])

    join, joined = None, {}
    if config.student.cache_teacher:
        join, joined = cached_maps, maps
    elif config.model.cache_posteriors:
        join, joined = cached_posteriors, posterior_shapes(teacher_cfg)
    return Task(STUDENT_FILE, spec.to_dict(), None, spec.image_size, shapes, init_params, compile_steps,
                join, joined, {"teacher": teacher.teacher_config_to_dict(teacher_cfg)})
