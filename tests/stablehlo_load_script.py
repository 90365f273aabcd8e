"""Score images with a StableHLO export as a deployment would: jax and numpy only, no dpiqa_jax.

    python stablehlo_load_script.py STUDENT.stablehlo IMAGES.npy SCORES.npy

Runs the artifact on the first image alone, then on all of them (its batch dimension is symbolic),
and saves both results one after the other; fails if anything beyond jax and numpy was imported."""
import sys

import jax
import numpy as np

artifact, images_file, scores_file = sys.argv[1:]
with open(artifact, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
images = np.load(images_file)
scores = [np.asarray(exported.call(images[:1])), np.asarray(exported.call(images))]
imported = {name.split(".")[0] for name in sys.modules}
unexpected = imported & {"dpiqa_jax", "flax", "tensorflow", "torch"}
assert not unexpected, f"imported {sorted(unexpected)}"
np.save(scores_file, np.concatenate(scores))
