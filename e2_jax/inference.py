"""Embeddings from a trained model, for use outside training: `Encoder`.

    from e2_jax.inference import Encoder
    enc = Encoder.from_workdir("workdirs/e2_b16")           # E² or CLIP-FT, its best parameters
    enc = Encoder.from_pretrained("models/clip_b16")         # a converted CLIP, as it is
    images = enc.encode_images(["a.jpg", "b.png"])          # [2, D], L2-normalised
    texts = enc.encode_texts(["black leather jacket"])       # [1, D], L2-normalised
    out = enc.image_outputs(["a.jpg"])                       # global, region embeddings, picks

Inputs of any number, in batches of `batch_size` over every local device (the last batch
padded). Images are file paths, PIL images or uint8 arrays [H, W, 3], preprocessed exactly as
the training pipeline does (shorter side resized bicubically to the model's size, centre crop,
CLIP normalisation); texts are tokenised by the same tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from e2_jax import pretrained, sharding, workdir
from e2_jax.data import pipeline
from e2_jax.data.tensorflow_cpu import tf
from e2_jax.data.tokenizer import CLIPTokenizer
from e2_jax.evaluation import evaluate
from e2_jax.images import ImageInput, load_image
from e2_jax.models.clip import CLIPConfig
from e2_jax.models.e2 import E2Config, E2Model
from e2_jax.numerics import l2_normalize


class ImageOutputs(NamedTuple):
    """`global_embedding` [N, D]; `region_embeddings` [N, G, D] (None for CLIP and CLIP-FT);
    `picks` [N, 2, K] patch index per fusion block and selection token (None without fusion).
    Embeddings L2-normalised."""

    global_embedding: np.ndarray
    region_embeddings: np.ndarray | None
    picks: np.ndarray | None


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """The training pipeline's evaluation preprocessing of one uint8 image: float32 [S, S, 3]."""
    return pipeline.normalize(pipeline.resize_and_crop(tf.constant(image), size)).numpy()


class Encoder:
    """A model and its parameters on this process's devices (replicated; batches split)."""

    def __init__(self, clip: CLIPConfig, e2: E2Config, params: dict, *, batch_size: int = 64,
                 source: str = "") -> None:
        self.clip, self.e2, self.source = clip, e2, source
        self.origin: dict[str, str] = {}  # how to load it again: {"workdir": ...} or {"pretrained": ...}
        self.model = E2Model(clip, e2)
        devices = jax.local_devices()
        self.mesh = sharding.make_mesh((("data", -1),), devices)
        self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        self.params = jax.device_put(params, self._replicated)
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.tokenizer = CLIPTokenizer()
        model = self.model

        @jax.jit
        def images(params, x):
            out = model.apply({"params": params}, x, False, method=E2Model.encode_image,
                              rngs={"gumbel": jax.random.key(0)})
            regions = None if out.region_embeddings is None else l2_normalize(out.region_embeddings)
            picks = None if out.picks is None else out.picks.transpose(1, 0, 2)
            return l2_normalize(out.global_embedding), regions, picks

        @jax.jit
        def texts(params, tokens):
            return l2_normalize(model.apply({"params": params}, tokens, method=E2Model.encode_text))

        self._images, self._texts = images, texts

    # --- loading --------------------------------------------------------------------------------

    @classmethod
    def from_workdir(cls, directory: str | os.PathLike, *, checkpoint: str = "best", **kw) -> Encoder:
        """The model a training run in `workdir` trained. `checkpoint`: "best" (the best
        parameters of the last stage that kept any, else the latest step), "latest", or a
        step number."""
        trained = workdir.load(directory, checkpoint)
        encoder = cls(trained.clip, trained.e2, trained.params, source=trained.where, **kw)
        encoder.origin = {"workdir": str(directory), "checkpoint": checkpoint}
        return encoder

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kw) -> Encoder:
        """A converted CLIP (`python -m e2_jax.convert to-flax ...`), without E²'s parts; or an
        E² model exported with `python -m e2_jax.convert from-workdir` (its model.json says which)."""
        clip, params = pretrained.load(path)
        e2 = pretrained.load_e2_config(path) or E2Config(selection_tokens=False)
        encoder = cls(clip, e2, params, source=str(path), **kw)
        encoder.origin = {"pretrained": str(Path(path).absolute())}
        return encoder

    # --- encoding -------------------------------------------------------------------------------

    def apply_images(self, images: jax.Array) -> ImageOutputs:
        """The model on a batch of preprocessed images (float32 [B, S, S, 3], B a multiple of
        the local device count), as device arrays."""
        return ImageOutputs(*self._images(self.params, images))

    def split_outputs(self, source, items: np.ndarray | None = None, batch_size: int = 256) -> dict[str, np.ndarray]:
        """A split's images through the input pipeline (every product's first view, or `items`,
        [M, 2] (product, view) pairs), each once across processes: {"global": [M, D],
        "regions": [M, G, D] (E² only), "index", "view"}, embeddings L2-normalised."""
        pre = pipeline.Preprocessing(image_size=self.clip.image_size, text_format="",
                                     context_length=self.clip.context_length)

        def embed(batch: dict) -> dict[str, jax.Array]:
            out = self.apply_images(batch["images"])
            return {"global": out.global_embedding} | (
                {} if out.region_embeddings is None else {"regions": out.region_embeddings})

        batches = pipeline.eval_batches(source, pre, global_batch=-(-batch_size // self.mesh.size) * self.mesh.size,
                                        sharding=sharding.batch_sharding(self.mesh, ("data",)), items=items)
        return evaluate.embed_split(embed, batches)

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        missing = self.batch_size - len(x)
        return np.concatenate([x, np.repeat(x[:1], missing, axis=0)]) if missing else x

    def image_outputs(self, images: Sequence[ImageInput]) -> ImageOutputs:
        outs: list[tuple] = []
        for start, stop in self._batches(len(images)):
            x = np.stack([preprocess(load_image(im), self.clip.image_size) for im in images[start:stop]])
            got = self._images(self.params, jax.device_put(self._pad(x), self._rows))
            outs.append(tuple(None if g is None else np.asarray(g)[: stop - start] for g in got))
        if not outs:
            d = self.clip.embed_dim
            return ImageOutputs(np.zeros((0, d), np.float32), None, None)
        join = lambda i: None if outs[0][i] is None else np.concatenate([o[i] for o in outs])
        return ImageOutputs(join(0), join(1), join(2))

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """[N, D] L2-normalised global image embeddings."""
        return self.image_outputs(images).global_embedding

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] L2-normalised text embeddings."""
        outs = []
        for start, stop in self._batches(len(texts)):
            tokens = self.tokenizer(list(texts[start:stop]), context_length=self.clip.context_length)
            got = self._texts(self.params, jax.device_put(self._pad(np.asarray(tokens, np.int32)), self._rows))
            outs.append(np.asarray(got)[: stop - start])
        return np.concatenate(outs) if outs else np.zeros((0, self.clip.embed_dim), np.float32)


def load_encoder(workdir: str | os.PathLike | None = None, pretrained: str | os.PathLike | None = None,
                 **kw) -> Encoder:
    """A training run's model (`workdir`) or a converted CLIP (`pretrained`): exactly one."""
    if bool(workdir) == bool(pretrained):
        raise ValueError("give exactly one of a training workdir or a converted CLIP (pretrained)")
    return Encoder.from_workdir(workdir, **kw) if workdir else Encoder.from_pretrained(pretrained, **kw)
