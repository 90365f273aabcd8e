"""The one error the data side raises for a dataset it cannot read."""
from dpiqa_jax.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset folder, label file or split that cannot be used: the one-line message says which
    file and what to do."""
