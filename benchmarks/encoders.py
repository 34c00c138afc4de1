"""Images/s and texts/s of the Flax CLIP encoders against open_clip's, same weights, one run.

    python -m benchmarks.encoders --model ViT-B-16 --image-batch 8 --text-batch 32 --repeats 5

Both sides run float32 inference on the same random weights (converted with e2_jax.convert)
and the same inputs; measurements alternate between the two so that machine noise hits both
alike; the median of `--repeats` timed calls is reported, after one untimed warm-up call each
(which includes JAX's compilation). Needs the test requirements (torch, open_clip).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import open_clip
import torch

from e2_jax import convert
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.models.clip import CLIP

OPEN_CLIP_NAMES = {"ViT-B-32": "ViT-B-32-quickgelu", "ViT-B-16": "ViT-B-16-quickgelu",
                   "ViT-L-14": "ViT-L-14-quickgelu"}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", choices=sorted(OPEN_CLIP_NAMES))
    parser.add_argument("--image-batch", type=int, default=8)
    parser.add_argument("--text-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    reference = open_clip.create_model(OPEN_CLIP_NAMES[args.model], pretrained=None).eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    config = convert.infer_config({k: v.shape for k, v in state.items()}, activation="quick_gelu")
    params = jax.device_put(convert.openai_to_flax(state, config))

    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.image_batch, config.image_size, config.image_size, 3), np.float32)
    from e2_jax.data.fashion_texts import corpus

    texts = (corpus() * 10)[: args.text_batch]
    tokens = CLIPTokenizer()(texts)
    images_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    tokens_torch = torch.from_numpy(tokens).long()

    model = CLIP(config)
    encode_image = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_image))
    encode_text = jax.jit(lambda p, x: model.apply({"params": p}, x, method=CLIP.encode_text))
    images_jax, tokens_jax = jax.device_put(images), jax.device_put(tokens)
    runs = {
        ("image", "flax"): lambda: encode_image(params, images_jax).block_until_ready(),
        ("image", "open_clip"): lambda: reference.encode_image(images_torch),
        ("text", "flax"): lambda: encode_text(params, tokens_jax).block_until_ready(),
        ("text", "open_clip"): lambda: reference.encode_text(tokens_torch),
    }
    with torch.inference_mode():
        for fn in runs.values():  # warm-up (and JAX compilation)
            fn()
        seconds = {key: [] for key in runs}
        for _ in range(args.repeats):  # interleaved, one call each per round
            for key, fn in runs.items():
                seconds[key].append(_seconds(fn))

    print(f"model {args.model}, float32, image batch {args.image_batch}, text batch {args.text_batch}, "
          f"median of {args.repeats}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), open_clip {open_clip.__version__}")
    print("| encoder | e2_jax (Flax) | open_clip (PyTorch) | Flax / PyTorch |")
    print("|---|---|---|---|")
    for tower, batch, unit in (("image", args.image_batch, "images/s"), ("text", args.text_batch, "texts/s")):
        flax_rate = batch / statistics.median(seconds[(tower, "flax")])
        torch_rate = batch / statistics.median(seconds[(tower, "open_clip")])
        print(f"| {tower} | {flax_rate:.1f} {unit} | {torch_rate:.1f} {unit} | {flax_rate / torch_rate:.2f}x |")


if __name__ == "__main__":
    main()
