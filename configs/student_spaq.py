"""The authors' student distillation on spaq (SPEC.md): `dpiqa-jax distill --config
configs/student_spaq.py --workdir runs/student_spaq --teacher runs/spaq` plus the paths of
configs/spaq.py."""
import spaq
import student_default


def get_config(arg=None):
    return student_default.authors_student(spaq.get_config(arg), milestones=(6,))
