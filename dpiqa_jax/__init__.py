"""DP-IQA in JAX/Flax: blind image quality assessment on a Stable Diffusion 1.5 prior.

    import dpiqa_jax
    scorer = dpiqa_jax.load("koniq_teacher.pth", prompt_embeddings="quality_embeddings.pth")
    scores = scorer(["photo.jpg"])
"""


def load(checkpoint, **kwargs):
    """A `dpiqa_jax.scorer.Scorer` for a checkpoint (the authors' .pth or one of ours)."""
    from dpiqa_jax.scorer import load as load_scorer

    return load_scorer(checkpoint, **kwargs)
