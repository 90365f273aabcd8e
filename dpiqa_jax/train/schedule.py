"""Learning-rate schedules and the optimizer, built from the config's `optim` group."""
import ml_collections
import optax

from dpiqa_jax.errors import UserError


def learning_rate(optim: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
    """'step': the authors' MultiStepLR, lr x `decay` after each epoch in `milestones` (it steps once
    per epoch, so the change lands on the first step of the next epoch); 'cosine': linear warmup
    then cosine decay to `lr * final_lr_ratio` at `total_steps`."""
    if optim.schedule == "step":
        boundaries = {int(epoch) * steps_per_epoch: optim.decay for epoch in optim.milestones}
        return optax.piecewise_constant_schedule(optim.lr, boundaries)
    if optim.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
            decay_steps=max(total_steps, optim.warmup_steps + 1), end_value=optim.lr * optim.final_lr_ratio)
    raise UserError(f"config key 'optim.schedule' is {optim.schedule!r}; choose 'step' or 'cosine'")


def optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Adam as torch's defaults (betas (0.9, 0.999), eps 1e-8, no weight decay) unless configured."""
    return optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
