"""Model definitions: CLIP towers (`clip`)."""
