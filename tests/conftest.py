import os
import sys

# Tests build tiny models on the CPU; keep JAX off any accelerator a developer's machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

from train_helpers import TEST_XLA_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()  # before JAX starts


def pytest_collection_modifyitems(items):
    """Slow tests first (a stable sort: each group keeps its order). With pyproject's
    --maxschedchunk=1, pytest-xdist hands each worker its next test as it frees up, so the long
    end-to-end runs start early, side by side, and the quick tests fill the gaps at the end instead
    of one worker finishing alone on a long run. Slow tests marked `warm` start after the other slow
    ones, by then compiled into the shared persistent compilation cache, instead of compiling the
    same programs beside them."""
    def rank(item):
        return 1 if item.get_closest_marker("warm") else 0 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)
