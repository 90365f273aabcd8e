"""The authors' student distillation on flive (SPEC.md): `dpiqa-jax distill --config
configs/student_flive.py --workdir runs/student_flive --teacher runs/flive` plus the paths of
configs/flive.py."""
import flive
import student_default


def get_config(arg=None):
    return student_default.authors_student(flive.get_config(arg), milestones=(4,))
