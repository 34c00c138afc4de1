"""Evaluation, every task of it: a model on a split under every registered retrieval protocol,
with its report (`evaluate`, `protocols`, `retrieval`, `report`); where the selection tokens
look (`selection`); linear probes (`probe`); zero-shot tagging (`tagging`); captioning with a
trained DeCap decoder and its metrics (`captioning`, `caption_metrics`); composed retrieval,
CIReVL and its baselines (`composed_retrieval`, `recompose`, `composed`). It imports nothing of
`training`."""
