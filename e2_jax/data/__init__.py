"""Input data: datasets (`builders/`, `build`), the input pipeline (`pipeline`), the CLIP
tokenizer (`tokenizer`), and the sources they read (`fashion_gen_h5`, `amazon_prepare`,
`synth_fashion`). Knows nothing of models."""
