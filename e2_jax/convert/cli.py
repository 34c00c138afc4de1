"""Weight conversion between PyTorch CLIP checkpoints and e2_jax, both ways.

Reads: an OpenAI TorchScript archive (`ViT-B-32.pt`; a pickle that runs code, so only with
`--trust-pickle`), an open_clip state dict (`.pt`/`.bin`/`.safetensors`) and a Hugging Face
`CLIPModel` folder (`config.json` + `model.safetensors`). Writes an e2_jax model directory
(see `e2_jax.pretrained`), and exports it back to an open_clip state dict or a HF folder.
The E² authors' PyTorch checkpoints (`rclip_v2_5.py`: CLIP's keys plus `visual.token_N_embedding`,
`visual.proj_{q,k,v}[2]`, `visual.ln_sN`, `visual.proj_cls`, `visual.proj_sN`) convert both ways.

Everything goes through one intermediate: a flat `{key: array}` dict in OpenAI's key layout
(which open_clip shares). Hugging Face keys are renamed into it (splitting / joining q, k, v),
and `LAYOUT` maps it onto the Flax tree. The architecture is inferred from tensor shapes.

    python -m e2_jax.convert to-flax ViT-B-32.pt out/clip_b32 --trust-pickle
    python -m e2_jax.convert to-flax open_clip_model.safetensors out/m --activation gelu
    python -m e2_jax.convert to-flax hf_clip_folder/ out/m
    python -m e2_jax.convert from-flax out/m exported.safetensors --format open_clip
    python -m e2_jax.convert from-flax out/m hf_folder/ --format hf
    python -m e2_jax.convert to-flax authors_e2.pt out/e2 --trust-pickle
    python -m e2_jax.convert from-flax out/e2 authors_format.pt --format e2_authors
    python -m e2_jax.convert from-workdir TRAINING_WORKDIR out/m      # a trained run's best parameters
"""

from __future__ import annotations

import argparse
import sys

from e2_jax import errors, pretrained, workdir
from e2_jax.convert.files import ConversionError, export_authors_e2, export_hf, export_open_clip, to_flax
from e2_jax.convert.layout import describe
from e2_jax.errors import UserError
from e2_jax.models.e2 import E2Config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("to-flax", help="PyTorch checkpoint -> e2_jax model directory")
    imp.add_argument("src", help="OpenAI .pt, open_clip .pt/.bin/.safetensors, or HF folder")
    imp.add_argument("out", help="output directory (written atomically)")
    imp.add_argument("--trust-pickle", action="store_true",
                     help="allow loading TorchScript / pickled objects (runs code from the file)")
    imp.add_argument("--activation", choices=["quick_gelu", "gelu"],
                     help="needed for open_clip state dicts")
    imp.add_argument("--model", help="preset the checkpoint must match, e.g. ViT-B-16")
    imp.add_argument("--vision-heads", type=int, help="default: width // 64 (OpenAI's rule)")
    imp.add_argument("--text-heads", type=int, help="default: width // 64 (OpenAI's rule)")
    imp.add_argument("--no-reference-quirks", action="store_true",
                     help="authors' E² checkpoints: run them without their code's quirks")
    imp.add_argument("--overwrite", action="store_true")
    exp = sub.add_parser("from-flax", help="e2_jax model directory -> open_clip, HF or E² authors' checkpoint")
    exp.add_argument("src", help="e2_jax model directory")
    exp.add_argument("out", help="file (.safetensors/.pt) for open_clip and e2_authors, folder for hf")
    exp.add_argument("--format", choices=["open_clip", "hf", "e2_authors"], required=True)
    exp.add_argument("--overwrite", action="store_true")
    wk = sub.add_parser("from-workdir", help="training workdir -> e2_jax model directory (CLIP or E²)")
    wk.add_argument("workdir", help="a directory python -m e2_jax.main trained in")
    wk.add_argument("out", help="output directory (written atomically)")
    wk.add_argument("--checkpoint", default="best",
                    help='"best" (by validation SumR, else the latest), "latest", or a step number')
    wk.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "from-workdir":
            trained = workdir.load(args.workdir, checkpoint=args.checkpoint)
            e2 = trained.e2 if trained.e2.selection_tokens else None
            pretrained.save(args.out, trained.clip, pretrained.to_numpy(trained.params), overwrite=args.overwrite,
                            e2=e2)
            print(f"wrote {args.out}: {'E² model' if e2 else 'CLIP'} from {trained.where}")
        elif args.command == "to-flax":
            heads = {k: v for k, v in (("vision_heads", args.vision_heads),
                                       ("text_heads", args.text_heads)) if v is not None}
            e2 = E2Config(reference_quirks=False) if args.no_reference_quirks else None
            converted = to_flax(args.src, args.out, trust_pickle=args.trust_pickle, activation=args.activation,
                                model=args.model, overwrite=args.overwrite, e2=e2, **heads)
            kind = "E² model" if converted.e2 else "CLIP"
            print(f"wrote {args.out}: {kind}, {describe(converted.config)}, "
                  f"activation {converted.config.activation}")
        else:
            config, params = pretrained.load(args.src)
            e2 = pretrained.load_e2_config(args.src)
            if (args.format == "e2_authors") != (e2 is not None):
                raise ConversionError(f"{args.src} is {'an E² model' if e2 else 'a CLIP'}: "
                                      f"--format {args.format} does not fit it")
            if args.format == "e2_authors":
                export_authors_e2(config, e2, params, args.out, overwrite=args.overwrite)
            else:
                export = export_open_clip if args.format == "open_clip" else export_hf
                export(config, params, args.out, overwrite=args.overwrite)
            print(f"wrote {args.out} ({args.format})")
    except (UserError, FileNotFoundError, FileExistsError) as e:  # ConversionError is a UserError
        print(f"error: {e}", file=sys.stderr)
        return errors.EXIT_USAGE
    return 0


