"""TensorFlow in a JAX process (TFDS's dataset builders and readers, TensorBoard's event writer,
the student's SavedModel export) with no GPU or TPU visible to it: a full `tensorflow` install (as
in Colab) would otherwise claim memory on the accelerators JAX trains on."""
import functools


@functools.cache
def tensorflow():
    """The `tensorflow` module, kept off the accelerators before it runs anything."""
    import tensorflow as tf

    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except RuntimeError:  # TF's runtime was started already, by code outside this package
            pass
    return tf
