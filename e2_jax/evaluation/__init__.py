"""Evaluation: a model on a split under every protocol, with its report (`evaluate`), and the
retrieval metrics, blocked over devices (`retrieval`). It imports nothing of `training`."""
