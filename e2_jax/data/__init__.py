"""Input data: the CLIP tokenizer (`tokenizer`)."""
