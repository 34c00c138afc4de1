"""What the input pipeline makes of an example: image size, text formats, tags. No TensorFlow
here (the trainer's step, benchmarks/device.py and the config schema import it on machines
without TensorFlow); e2_jax/data/pipeline.py does the work."""

from __future__ import annotations

import dataclasses
import string

# CLIP's image normalisation (E2_METHOD.md section 1).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# The authors' global texts (E2_METHOD.md sections 3 and 5).
FASHIONGEN_TEXT = "{composition}.{subcategory}.{brand}.{season}.{description}"
AMAZON_TEXT = "{brand}. {title}"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What the pipeline makes of an example. `tags`: one (group name, text field, context
    length) per region group; a longer tag keeps its first tokens and its end token."""

    image_size: int = 224
    text_format: str = FASHIONGEN_TEXT
    tags: tuple[tuple[str, str, int], ...] = ()
    context_length: int = 77
    region_texts: str = "packed"  # how training batches carry the tags (region_texts.MODES)
    pad_ratio: float = 0.0

    def fields(self) -> list[str]:
        """The text fields this preprocessing reads."""
        named = [name for _, name, _, _ in string.Formatter().parse(self.text_format) if name]
        return list(dict.fromkeys([*named, *(field for _, field, _ in self.tags)]))
