"""Distilling the demo teacher into a small student on synthetic_iqa (SPEC's loss, no downloads).

    dpiqa-jax distill --config configs/student_demo.py --workdir runs/student_demo --teacher runs/demo
    dpiqa-jax distill --config configs/student_demo.py:smoke --workdir runs/s --teacher runs/smoke

The data, seed and schedule follow configs/demo.py (and its `smoke` variant), so the student sees
the teacher's split. EfficientNet-B0 from scratch stands in for the authors' ImageNet B7 (`smoke`: a
one-block-a-stage EfficientNet, 'tiny', since compiling B0's 16 blocks is most of a test's time).
"""
import demo
import student_default


def get_config(arg=None):
    variant = "tiny" if arg == "smoke" else "b0"
    config = student_default.add_student(demo.get_config(arg), variant=variant, fc_width=64)
    config.optim.lr = 1e-3
    # The demo teacher's random VAE has posteriors as wide as its means (std ~1), so drawn latents
    # would make every step's teacher map a different noise; its mean maps are computed once.
    config.model.latents = "mean"
    config.student.cache_teacher = True
    return config
