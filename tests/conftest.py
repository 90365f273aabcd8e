import os
import sys

# Tests build tiny models on the CPU; keep JAX off any accelerator a developer's machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
