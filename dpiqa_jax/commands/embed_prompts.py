"""`dpiqa-jax embed-prompts`: the (1485, 768) prompt matrix from a local CLIP ViT-L/14 folder."""
from dpiqa_jax.commands import positive_int


def register(sub):
    p = sub.add_parser("embed-prompts", help="compute the prompt-embedding matrix with a local CLIP model")
    p.add_argument("--clip", required=True, help="local transformers-format CLIP folder (config.json, "
                   "model.safetensors, tokenizer files), e.g. openai/clip-vit-large-patch14")
    p.add_argument("--output", required=True, help="output file (.npy)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.set_defaults(run=run)


def run(args):
    from dpiqa_jax import outputs
    from dpiqa_jax.prompts import embed_prompts, save_prompt_embeddings

    outputs.file(args.output, (".npy",))
    embeddings = embed_prompts(args.clip, batch_size=args.batch_size)
    save_prompt_embeddings(embeddings, args.output)
    print(f"wrote {embeddings.shape[0]} prompt embeddings of dim {embeddings.shape[1]} to {args.output}")
