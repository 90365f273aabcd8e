"""The authors' student distillation on koniq10k (SPEC.md): `dpiqa-jax distill --config
configs/student_koniq10k.py --workdir runs/student_koniq10k --teacher runs/koniq10k` plus the paths of
configs/koniq10k.py."""
import koniq10k
import student_default


def get_config(arg=None):
    return student_default.authors_student(koniq10k.get_config(arg), milestones=(5,))
