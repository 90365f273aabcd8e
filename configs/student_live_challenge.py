"""The authors' student distillation on LIVE Challenge (SPEC.md), from a teacher of
configs/live_challenge.py: `dpiqa-jax distill --config configs/student_live_challenge.py
--workdir runs/student_clive --teacher runs/clive` with that config's dataset path."""
import live_challenge
import student_default


def get_config(arg=None):
    return student_default.authors_student(live_challenge.get_config(arg), milestones=(10, 25))
