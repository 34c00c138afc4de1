"""Weight conversion between PyTorch CLIP checkpoints and e2_jax, both ways.

    layout.py   the parameter layout: OpenAI/open_clip, Hugging Face and E² authors' keys <-> the
                Flax tree (pure tables; shapes from the model's own `param_shapes`)
    files.py    reading checkpoint files (TorchScript, .pt/.bin, .safetensors, HF folders) and
                writing e2_jax model directories and PyTorch exports
    cli.py      `python -m e2_jax.convert` (its docstring lists the commands)
"""

from e2_jax.convert.cli import main
from e2_jax.convert.files import (
    Converted,
    TensorFile,
    export_authors_e2,
    export_hf,
    export_open_clip,
    load_torch,
    load_torch_clip,
    read_checkpoint,
    to_flax,
    write_state_dict,
)
from e2_jax.convert.layout import (
    ConversionError,
    authors_e2_to_flax,
    expected_shapes,
    flax_to_authors_e2,
    flax_to_openai,
    hf_to_openai,
    infer_config,
    layout,
    openai_to_flax,
    openai_to_hf,
)

__all__ = ["ConversionError", "Converted", "TensorFile", "authors_e2_to_flax", "expected_shapes", "export_authors_e2",
           "export_hf", "export_open_clip", "flax_to_authors_e2", "flax_to_openai", "hf_to_openai", "infer_config",
           "layout", "load_torch", "load_torch_clip", "main", "openai_to_flax", "openai_to_hf", "read_checkpoint",
           "to_flax", "write_state_dict"]
