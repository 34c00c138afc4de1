"""Embeddings from a trained model, for use outside training: `Encoder`.

    from e2_jax.inference import Encoder
    enc = Encoder.from_workdir("workdirs/e2_b16")           # E² or CLIP-FT, its best parameters
    enc = Encoder.from_pretrained("models/clip_b16")         # a converted CLIP, as it is
    images = enc.encode_images(["a.jpg", "b.png"])          # [2, D], L2-normalised
    texts = enc.encode_texts(["black leather jacket"])       # [1, D], L2-normalised
    out = enc.image_outputs(["a.jpg"])                       # global, region embeddings, picks
    pixels = enc.preprocess_images(["a.jpg"])                # float32 [1, S, S, 3]: what the model takes
    tokens = enc.tokenize(["black leather jacket"])          # int32 [1, L]: what the text encoder takes
    enc.encode_images(pixels), enc.encode_texts(tokens)      # the same embeddings, from arrays
    enc.encode_images(pixels, normalize=False)               # raw: before the L2 normalisation

Inputs of any number, in batches of `batch_size` over every local device (the last batch
padded). Images are file paths, PIL images or uint8 arrays [H, W, 3], preprocessed exactly as
the training pipeline does (shorter side resized bicubically to the model's size, centre crop,
CLIP normalisation), or one float array [N, S, S, 3] already preprocessed so (S the model's
`image_size`; values `(pixel / 255 - mean) / std` with CLIP's mean and std, about -1.8 to 2.1).
Texts are strings, tokenised by the same tokenizer, or one integer array [N, L] of token ids
(L the model's `context_length`; ids in [0, vocab_size): start token, the text's tokens, end
token, zeros after it, as `tokenize` writes them).
"""

from __future__ import annotations

import functools
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
                 source: str = "", devices: Sequence[jax.Device] | None = None) -> None:
        """`devices`: where the model runs, batches split over them (default: every local device)."""
        self.clip, self.e2, self.source = clip, e2, source
        self.origin: dict[str, str] = {}  # how to load it again: {"workdir": ...} or {"pretrained": ...}
        self.model = E2Model(clip, e2)
        devices = list(devices or jax.local_devices())
        self.mesh = sharding.make_mesh((("data", -1),), devices)
        self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self._rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("data"))
        self.params = jax.device_put(params, self._replicated)
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.tokenizer = CLIPTokenizer()
        model = self.model

        @functools.partial(jax.jit, static_argnums=2)
        def images(params, x, normalize=True):
            out = model.apply({"params": params}, x, False, method=E2Model.encode_image,
                              rngs={"gumbel": jax.random.key(0)})
            norm = l2_normalize if normalize else (lambda v: v)
            regions = None if out.region_embeddings is None else norm(out.region_embeddings)
            picks = None if out.picks is None else out.picks.transpose(1, 0, 2)
            return norm(out.global_embedding), regions, picks

        @functools.partial(jax.jit, static_argnums=2)
        def texts(params, tokens, normalize=True):
            out = model.apply({"params": params}, tokens, method=E2Model.encode_text)
            return l2_normalize(out) if normalize else out

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

    def apply_images(self, images: jax.Array, normalize: bool = True) -> ImageOutputs:
        """The model on a batch of preprocessed images (float32 [B, S, S, 3], B a multiple of
        the local device count), as device arrays."""
        return ImageOutputs(*self._images(self.params, images, normalize))

    def split_outputs(self, source, items: np.ndarray | None = None, batch_size: int = 256, *,
                      normalize: bool = True, progress: bool = False, pad_ratio: float = 0.0) -> dict[str, np.ndarray]:
        """A split's images through the input pipeline (every product's first view, or `items`,
        [M, 2] (product, view) pairs), each once across processes: {"global": [M, D],
        "regions": [M, G, D] (E² only), "index", "view"}, embeddings L2-normalised unless
        `normalize=False`; `progress`: a bar of the batches (process 0); `pad_ratio`: CIReVL's
        TargetPad before resizing (`Preprocessing.pad_ratio`; 0, the default: none)."""
        pre = pipeline.Preprocessing(image_size=self.clip.image_size, text_format="",
                                     context_length=self.clip.context_length, pad_ratio=pad_ratio)

        def embed(batch: dict) -> dict[str, jax.Array]:
            out = self.apply_images(batch["images"], normalize)
            return {"global": out.global_embedding} | (
                {} if out.region_embeddings is None else {"regions": out.region_embeddings})

        global_batch = -(-batch_size // self.mesh.size) * self.mesh.size
        batches = pipeline.eval_batches(source, pre, global_batch=global_batch,
                                        sharding=sharding.batch_sharding(self.mesh, ("data",)), items=items)
        if progress:
            from tqdm import tqdm

            steps = pipeline.eval_steps(len(source) if items is None else len(items), global_batch)
            batches = tqdm(batches, total=steps, unit="batch", disable=jax.process_index() != 0, leave=False)
        return pipeline.embed_split(embed, batches)

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield start, min(start + self.batch_size, n)

    def _pad(self, x: np.ndarray) -> np.ndarray:
        missing = self.batch_size - len(x)
        return np.concatenate([x, np.repeat(x[:1], missing, axis=0)]) if missing else x

    def _apply(self, fn, n: int, batch, normalize: bool) -> list[tuple]:
        """`fn` on rows [0, n) in batches (`batch(start, stop)` makes one), as host arrays."""
        outs = []
        for start, stop in self._batches(n):
            got = fn(self.params, jax.device_put(self._pad(batch(start, stop)), self._rows), normalize)
            got = got if isinstance(got, tuple) else (got,)
            outs.append(tuple(None if g is None else np.asarray(g)[: stop - start] for g in got))
        return outs

    def preprocess_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """float32 [N, S, S, 3]: the images as the model takes them (see the module's doc)."""
        size = self.clip.image_size
        if not len(images):
            return np.zeros((0, size, size, 3), np.float32)
        return np.stack([preprocess(load_image(im), size) for im in images])

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """int32 [N, L]: the texts' token ids as the text encoder takes them."""
        return np.asarray(self.tokenizer(list(texts), context_length=self.clip.context_length), np.int32).reshape(
            len(texts), self.clip.context_length)

    def _pixels(self, images: np.ndarray) -> np.ndarray:
        """A batch of preprocessed images, checked."""
        size = self.clip.image_size
        if images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"preprocessed images are float [N, {size}, {size}, 3] for {self.source or 'this model'}, "
                             f"got {images.dtype} {list(images.shape)}; pass files, PIL images or uint8 arrays to "
                             "have them preprocessed")
        if not np.all(np.isfinite(images)):
            raise ValueError("preprocessed images hold NaN or infinite values")
        return images.astype(np.float32, copy=False)

    def _tokens(self, tokens: np.ndarray) -> np.ndarray:
        """A batch of token ids, checked."""
        length, vocab = self.clip.context_length, self.clip.vocab_size
        if tokens.ndim != 2 or tokens.shape[1] != length:
            raise ValueError(f"token ids are an integer array [N, {length}] (the model's context length), got "
                             f"{list(tokens.shape)}; Encoder.tokenize makes them from strings")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            raise ValueError(f"token ids must lie in [0, {vocab}), got {tokens.min()} to {tokens.max()}")
        return tokens.astype(np.int32, copy=False)

    def image_outputs(self, images: Sequence[ImageInput] | np.ndarray, *, normalize: bool = True) -> ImageOutputs:
        """Global and region embeddings (L2-normalised, or raw with `normalize=False`) and picks
        of `images`: files, PIL images, uint8 arrays, or a float array [N, S, S, 3] preprocessed."""
        if isinstance(images, np.ndarray) and images.dtype.kind == "f":
            pixels = self._pixels(images)
            outs = self._apply(self._images, len(pixels), lambda a, b: pixels[a:b], normalize)
        else:
            outs = self._apply(self._images, len(images), lambda a, b: self.preprocess_images(images[a:b]), normalize)
        if not outs:
            d = self.clip.embed_dim
            return ImageOutputs(np.zeros((0, d), np.float32), None, None)
        join = lambda i: None if outs[0][i] is None else np.concatenate([o[i] for o in outs])
        return ImageOutputs(join(0), join(1), join(2))

    def encode_images(self, images: Sequence[ImageInput] | np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """[N, D] global image embeddings (L2-normalised unless `normalize=False`)."""
        return self.image_outputs(images, normalize=normalize).global_embedding

    def encode_texts(self, texts: Sequence[str] | np.ndarray, *, normalize: bool = True) -> np.ndarray:
        """[N, D] text embeddings (L2-normalised unless `normalize=False`) of strings or of token
        ids [N, L]."""
        if isinstance(texts, np.ndarray) and texts.dtype.kind in "iu":
            tokens = self._tokens(texts)
            outs = self._apply(self._texts, len(tokens), lambda a, b: tokens[a:b], normalize)
        else:
            outs = self._apply(self._texts, len(texts), lambda a, b: self.tokenize(texts[a:b]), normalize)
        return np.concatenate([o[0] for o in outs]) if outs else np.zeros((0, self.clip.embed_dim), np.float32)


def load_encoder(workdir: str | os.PathLike | None = None, pretrained: str | os.PathLike | None = None,
                 **kw) -> Encoder:
    """A training run's model (`workdir`) or a converted CLIP (`pretrained`): exactly one."""
    if bool(workdir) == bool(pretrained):
        raise ValueError("give exactly one of a training workdir or a converted CLIP (pretrained)")
    return Encoder.from_workdir(workdir, **kw) if workdir else Encoder.from_pretrained(pretrained, **kw)
