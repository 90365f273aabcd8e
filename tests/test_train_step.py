"""The train/eval steps, losses and schedules, on a stand-in model that compiles in a second."""
import functools
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from train_fakes import FakeStudent, FakeTeacher, adam, fake_batch, fake_params

from dpiqa_jax.train import mesh as mesh_lib
from dpiqa_jax.train import schedule
from dpiqa_jax.train import state as state_lib
from dpiqa_jax.train import step as step_lib
from dpiqa_jax.train.distill import distill_step
from dpiqa_jax.train.step import compile_eval_step, compile_train_step, ranking_loss


def make(latent_mode="sample", rank_weight=0.0, mesh=None):
    mesh = mesh or mesh_lib.make_mesh(1)
    tx, params = adam(), fake_params()
    abstract = state_lib.abstract_state(jax.eval_shape(lambda: params), tx)
    shardings = state_lib.state_shardings(mesh, abstract)
    state = state_lib.create_state(params, tx, jax.random.PRNGKey(0), shardings)
    step = compile_train_step(FakeTeacher(), tx, mesh, shardings, latent_mode=latent_mode,
                              rank_weight=rank_weight)
    return state, step, jnp.ones((4, 8))


def copy(state):
    return jax.tree.map(jnp.copy, state)  # the step donates its input


def test_ranking_loss_matches_the_authors_pairwise_loop():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=12), rng.uniform(size=12)
    margin = 0.25 * np.std(target, ddof=1)  # torch's Tensor.std is unbiased
    pairs = [max(0.0, -np.sign(target[i] - target[j]) * (pred[i] - pred[j]) + margin)
             for i, j in itertools.combinations(range(12), 2)]
    loss = ranking_loss(jnp.asarray(pred), jnp.asarray(target))
    np.testing.assert_allclose(loss, np.mean(pairs), rtol=1e-6)


def test_vae_is_frozen_without_optimizer_state():
    state, step, embeddings = make()
    vae_before = jax.tree.map(np.asarray, state.frozen)
    params_before = jax.tree.map(np.asarray, state.params)
    assert set(state.frozen) == {"vae"} and "vae" not in state.params
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
    assert paths and not any("vae" in p for p in paths)
    for _ in range(3):
        state, _ = step(state, fake_batch(), embeddings)
    jax.tree.map(np.testing.assert_array_equal, state.frozen, vae_before)
    assert not np.allclose(state.params["head"]["kernel"], params_before["head"]["kernel"])
    assert int(state.step) == 3


def test_training_reduces_the_loss_and_reports_its_metrics():
    state, step, embeddings = make(latent_mode="mean")
    losses = []
    for _ in range(30):
        state, metrics = step(state, fake_batch(), embeddings)
        losses.append(float(metrics["loss"]))
    assert set(metrics) == {"loss", "mse", "rank_loss", "grad_norm", "param_norm", "is_finite"}
    assert bool(metrics["is_finite"]) and float(metrics["grad_norm"]) > 0
    assert losses[-1] < 0.2 * losses[0]


def test_rank_weight_adds_the_ranking_loss():
    state, step, embeddings = make(rank_weight=0.5)
    _, metrics = step(state, fake_batch(), embeddings)
    assert float(metrics["rank_loss"]) > 0
    np.testing.assert_allclose(metrics["loss"], metrics["mse"] + 0.5 * metrics["rank_loss"], rtol=1e-6)


def test_a_non_finite_loss_is_flagged():
    state, step, embeddings = make()
    batch = fake_batch()
    batch["target"][3] = np.nan
    _, metrics = step(state, batch, embeddings)
    assert not bool(metrics["is_finite"])


@pytest.mark.parametrize("mode, differ", [("sample", True), ("mean", False)])
def test_latent_draws_depend_on_the_step_number_only(mode, differ):
    state, step, embeddings = make(latent_mode=mode)
    loss = lambda s: float(step(copy(s), fake_batch(), embeddings)[1]["loss"])
    at_0, again_0 = loss(state), loss(state)
    at_5 = loss(state.replace(step=state.step + 5))
    assert at_0 == again_0  # a resumed run at step k draws what the uninterrupted one drew
    assert (at_0 != at_5) == differ


@pytest.mark.parametrize("mode", ["sample", "mean"])
def test_cached_posteriors_give_the_step_of_the_vae_itself(mode):
    """The cache's fast path: posteriors computed once by `posterior_step` (stored as float32) and
    carried by the batch give the same step as the VAE run inside it; other posteriors in the
    batch would change it, so the step does use the batch's."""
    state, step, embeddings = make(latent_mode=mode)
    batch = fake_batch()
    out = jax.jit(functools.partial(step_lib.posterior_step, model=FakeTeacher()))(
        state.full_params(), batch | {"mask": np.ones(16, np.float32)})
    cached = batch | {key: np.asarray(out[key], np.float32) for key in step_lib.POSTERIOR}
    plain_state, plain = step(copy(state), batch, embeddings)
    cached_state, got = step(copy(state), cached, embeddings)
    # Two XLA programs (the VAE inside the step, or its posteriors as inputs) round differently:
    # up to 2.6e-6 relative at the tests' XLA:CPU optimisation level 0.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8),
                 (cached_state, got), (plain_state, plain))
    shifted = cached | {"posterior_mean": cached["posterior_mean"] + 1}
    assert float(step(copy(state), shifted, embeddings)[1]["loss"]) != float(plain["loss"])


def test_eval_step_scores_with_the_posterior_mean_and_keeps_the_mask():
    state, _, embeddings = make()
    mesh = mesh_lib.make_mesh(1)
    shardings = jax.tree.map(lambda _: mesh_lib.replicated(mesh), state.full_params())
    evaluate = compile_eval_step(FakeTeacher(), mesh, shardings, latent_mode="mean")
    batch = fake_batch(8) | {"mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)}
    out = evaluate(state.full_params(), batch, embeddings, jax.random.PRNGKey(1))
    expected, _ = FakeTeacher().apply({"params": state.full_params()}, batch["image"], embeddings)
    np.testing.assert_allclose(out["score"], expected, rtol=1e-6)
    np.testing.assert_array_equal(out["mask"], batch["mask"])
    np.testing.assert_array_equal(out["target"], batch["target"])


def optim(**kw):
    fields = dict(lr=1e-5, b1=0.9, b2=0.999, eps=1e-8, schedule="step", milestones=(5,), decay=0.2,
                  warmup_steps=0, final_lr_ratio=0.0)
    return ml_collections.ConfigDict(fields | kw)


def distill_state(student, batch: dict, tx) -> tuple[dict, state_lib.TrainState]:
    """(the student's initial variables, its train state at step 0 with the batch statistics frozen)."""
    variables = student.init(jax.random.PRNGKey(1), jnp.asarray(batch["image"]))
    trainable = {"params": variables["params"]}
    return variables, state_lib.TrainState(step=jnp.array(0), params=trainable, opt_state=tx.init(trainable),
                                           frozen={"batch_stats": variables["batch_stats"]},
                                           rng=jax.random.PRNGKey(2))


def test_distill_step_is_spec_loss_and_its_gradient():
    # SGD makes the update the gradient itself; the loss, gradient and batch statistics are checked
    # against a direct computation of MSE(score, target) + map_weight * MSE(student map, teacher map).
    batch, embeddings, lr, weight = fake_batch(), jnp.ones((4, 8)), 0.1, 0.7
    teacher, teacher_params, student = FakeTeacher(), fake_params(), FakeStudent()
    tx = optax.sgd(lr)
    variables, state = distill_state(student, batch, tx)
    inputs = {"teacher": teacher_params, "embeddings": embeddings}
    step = jax.jit(functools.partial(distill_step, student=student, teacher_model=teacher, tx=tx,
                                     latent_mode="mean", map_weight=weight))
    new, metrics = step(state, batch, inputs)

    _, teacher_map = teacher.apply({"params": teacher_params}, jnp.asarray(batch["image"]), embeddings)
    # The teacher's maps given in the batch (the cache) make the same step, without the teacher.
    cached, cached_metrics = step(state, {**batch, "teacher_map": np.asarray(teacher_map)}, inputs)
    for got, want in zip(jax.tree.leaves((cached, cached_metrics)), jax.tree.leaves((new, metrics)),
                         strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    drop_key = jax.random.split(jax.random.fold_in(state.rng, 0))[1]

    def direct(params):
        (score, fmap), stats = student.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                             batch["image"], train=True, rngs={"dropout": drop_key},
                                             mutable=["batch_stats"])
        mse = jnp.mean((score - batch["target"]) ** 2)
        return mse + weight * jnp.mean((fmap - teacher_map) ** 2), (mse, stats)

    (loss, (mse, stats)), grads = jax.value_and_grad(direct, has_aux=True)(variables["params"])
    np.testing.assert_allclose(metrics["loss"], loss, rtol=2e-5)  # jitted vs eager float32
    np.testing.assert_allclose(metrics["mse"], mse, rtol=2e-5)
    np.testing.assert_allclose(metrics["map_loss"], (loss - mse) / weight, rtol=5e-5)
    expected = jax.tree.map(lambda p, g: p - lr * g, variables["params"], grads)
    # The bias before BN: its exact gradient is 0 (BN takes away any shift); what moves it is rounding.
    np.testing.assert_allclose(new.params["params"]["body"]["bias"], variables["params"]["body"]["bias"],
                               atol=1e-5)
    got = traverse_util.flatten_dict(new.params["params"])
    for path, want in traverse_util.flatten_dict(expected).items():
        if path != ("body", "bias"):
            np.testing.assert_allclose(got[path], want, rtol=1e-5, atol=2e-6, err_msg=str(path))
    for got, want in zip(jax.tree.leaves(new.frozen), jax.tree.leaves(stats), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert not np.allclose(new.frozen["batch_stats"]["bn"]["mean"], variables["batch_stats"]["bn"]["mean"])
    assert int(new.step) == 1


def test_distill_step_reads_cached_posteriors_as_the_teacher_step_does():
    """Distillation without cached maps but with the teacher's VAE posteriors in the batch (the
    authors' configs) makes the step of the VAE run inside it, latents still drawn each step."""
    batch, embeddings, teacher, student = fake_batch(), jnp.ones((4, 8)), FakeTeacher(), FakeStudent()
    teacher_params = fake_params()
    tx = optax.sgd(0.1)  # Adam would turn the rounding noise of the pre-BN bias's zero gradient into +-lr
    _, state = distill_state(student, batch, tx)
    inputs = {"teacher": teacher_params, "embeddings": embeddings}
    step = jax.jit(functools.partial(distill_step, student=student, teacher_model=teacher, tx=tx,
                                     latent_mode="sample"))
    out = jax.jit(functools.partial(step_lib.posterior_step, model=teacher))(
        teacher_params, batch | {"mask": np.ones(16, np.float32)})
    cached = batch | {key: np.asarray(out[key], np.float32) for key in step_lib.POSTERIOR}
    plain_state, plain = step(state, batch, inputs)
    cached_state, got = step(state, cached, inputs)
    # Two XLA programs: rounding only, which moves the pre-BN bias (zero gradient) by up to 6e-7.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6),
                 (cached_state, got), (plain_state, plain))
    assert float(plain["map_loss"]) > 0
    shifted = cached | {"posterior_mean": cached["posterior_mean"] + 1}
    assert abs(float(step(state, shifted, inputs)[1]["map_loss"]) - float(plain["map_loss"])) > 1e-3


def test_step_decay_lands_after_each_milestone_epoch():
    lr = schedule.learning_rate(optim(milestones=(2, 4)), steps_per_epoch=10, total_steps=300)
    for step, expected in [(0, 1e-5), (19, 1e-5), (20, 2e-6), (39, 2e-6), (40, 4e-7), (299, 4e-7)]:
        assert float(lr(step)) == pytest.approx(expected, rel=1e-6), step


def test_warmup_cosine():
    lr = schedule.learning_rate(optim(schedule="cosine", lr=1e-3, warmup_steps=10, final_lr_ratio=0.1),
                                steps_per_epoch=10, total_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(60)) == pytest.approx(0.55e-3, rel=1e-4)
    assert float(lr(110)) == pytest.approx(1e-4)
