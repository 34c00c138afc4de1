"""CLIP's byte-level BPE tokenizer, offline, on the Rust `tokenizers` library.

Gives the ids of OpenAI's tokenizer as open_clip's `SimpleTokenizer` implements it: the same
clean-up (`ftfy.fix_text`, HTML unescape twice, whitespace collapsed, lower case), the same
pre-tokenisation regex, and the same 49,408-entry vocabulary, built from the BPE merges file
that OpenAI ships with CLIP (`bpe_simple_vocab_16e6.txt.gz`, shipped in this package, MIT).

Texts longer than the context keep their first `context_length - 1` tokens (start token
included) and end with the end token: the convention of OpenAI's `clip.tokenize(truncate=True)`,
open_clip and E² (E2_METHOD.md section 3). Padding is 0, as in open_clip; the end token is the
largest id, so pooling at `argmax(ids)` finds it.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import re
from collections.abc import Sequence

import ftfy
import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the file.
SOT, EOT = "<start_of_text>", "<end_of_text>"  # open_clip's names for the two special tokens
CONTEXT_LENGTH = 77
# OpenAI's pre-tokenisation pattern (clip/simple_tokenizer.py), applied to lower-cased text.
_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Characters ftfy.fix_text may change in otherwise-ASCII text: '&' (it unescapes HTML entities,
# once more than html.unescape twice does) and control characters (it removes most of them,
# and terminal escapes). Text without any of these and non-ASCII is a fixed point of fix_text.
_FTFY_NEEDED = re.compile(r"[^\t\n\r\x20-\x7e]|&")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def clean(text: str) -> str:
    """open_clip's `_clean_lower`: ftfy, HTML unescape twice, collapse whitespace, lower case."""
    if _FTFY_NEEDED.search(text):  # fix_text costs ~30 us a string; skip it where it is a no-op.
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = importlib.resources.files("e2_jax.data").joinpath(BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
    return {token: i for i, token in enumerate(vocab)}, merges


class CLIPTokenizer:
    """`tokenizer(texts) -> int32 [N, context_length]`, batched in Rust.

    Attributes: `sot_id` (49406), `eot_id` (49407), `vocab_size` (49408), `context_length`.
    """

    def __init__(self, context_length: int = CONTEXT_LENGTH, pad_id: int = 0) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (start and end tokens), got {context_length}")
        vocab, merges = _vocab_and_merges()
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # As in open_clip, the special tokens' own spelling inside a text maps to their ids.
        tok.add_special_tokens([SOT, EOT])
        self._tokenizer = tok
        self.context_length, self.pad_id = context_length, pad_id
        self.sot_id, self.eot_id = vocab[SOT], vocab[EOT]
        self.vocab_size = len(vocab)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without start/end tokens and without truncation."""
        return self._tokenizer.encode(clean(text), add_special_tokens=False).ids

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        # encode_batch_fast skips character offsets, which nothing here needs.
        encodings = self._tokenizer.encode_batch_fast([clean(t) for t in texts], add_special_tokens=False)
        out = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        out[:, 0] = self.sot_id
        for row, encoding in zip(out, encodings, strict=True):
            ids = encoding.ids[: length - 2]
            row[1 : 1 + len(ids)] = ids
            row[1 + len(ids)] = self.eot_id
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens and padding dropped), words separated by spaces."""
        keep = [int(i) for i in ids if int(i) not in (self.sot_id, self.eot_id, self.pad_id)]
        return self._tokenizer.decode(keep).replace("</w>", " ").strip()
