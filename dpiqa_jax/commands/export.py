"""`dpiqa-jax export --checkpoint CKPT --format FORMAT --output PATH`: a student's weights (msgpack,
safetensors) or its inference function (stablehlo, savedmodel), verified by reloading it."""
import dataclasses

from dpiqa_jax.commands import positive_int
from dpiqa_jax.export import FORMATS


def register(sub):
    p = sub.add_parser("export", help="write a student in a portable format, checked by reloading it",
                       description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a student: the authors' .pth or .safetensors, or one of our .msgpack/.safetensors")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="msgpack/safetensors: weights with a manifest; stablehlo: jax.export bytes; "
                        "savedmodel: a TensorFlow SavedModel folder")
    p.add_argument("--output", required=True, help="the file (the folder for savedmodel) to write")
    add_student_arguments(p)
    p.set_defaults(run=run)


def add_student_arguments(parser) -> None:
    group = parser.add_argument_group("an authors' student file whose shapes are not B7 at 512 px")
    group.add_argument("--variant", help="its EfficientNet variant (default b7)")
    group.add_argument("--image-size", type=positive_int, help="its input side in pixels (default 512)")


def student_spec(args):
    """The StudentSpec that --variant/--image-size describe, or None when neither is given."""
    from dpiqa_jax.student_io import AUTHORS_SPEC

    flags = {"variant": args.variant, "image_size": args.image_size}
    given = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(AUTHORS_SPEC, **given) if given else None


def run(args):
    from dpiqa_jax.export import export_student
    from dpiqa_jax.student_io import load_student

    spec, variables = load_student(args.checkpoint, student_spec(args))
    error = export_student(spec, variables, args.format, args.output)
    print(f"wrote {args.format} {args.output} (student {spec.variant}, {spec.image_size} px); "
          f"reloaded scores: max rel error {error:.1e}")
