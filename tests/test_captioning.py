"""DeCap captioning: the decoder's cached decoding equals its full forward pass, beam search is
a search, the memory projection is DeCap's formula, a decoder learns to write captions back
from their embeddings, the metrics are the standard ones; and the command runs end to end."""

import dataclasses
import html
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2_jax.evaluation import caption_metrics
from e2_jax.evaluation import captioning as captioner
from e2_jax.models.caption_decoder import CaptionDecoder, DecoderConfig, init_cache, init_params
from e2_jax.training import decap
from tests.browser import images_loaded
from tests.processes import xla_flags

EOT = 5  # the end id of the small vocabularies below


def _small(vocab=8, length=4):
    return DecoderConfig(prefix_dim=6, width=16, layers=2, heads=2, max_length=length, vocab_size=vocab)


def _mean_logprob(params, config, prefix, seqs):
    """Mean log p(id_t | prefix, ids_<t) over each sequence's ids up to and including its first
    end id, by the full (uncached) forward pass; seqs [N, L]."""
    seqs = np.asarray(seqs)
    logits = CaptionDecoder(config).apply({"params": params}, jnp.broadcast_to(prefix, (len(seqs), prefix.shape[0])),
                                          jnp.asarray(seqs[:, :-1], jnp.int32))
    logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), seqs[..., None], axis=2)[..., 0]
    counted = np.cumsum(seqs == EOT, axis=1) - (seqs == EOT) == 0
    return (logp * counted).sum(1) / counted.sum(1)


def test_cached_decoding_equals_the_full_forward_pass():
    config = _small(vocab=11, length=6)
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    prefix = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 11, (3, 5)), jnp.int32)
    full = CaptionDecoder(config).apply({"params": params}, prefix, tokens)  # [3, 6, V]
    cache = init_cache(config, 3)
    model = CaptionDecoder(config, decode=True)
    last = jnp.zeros(3, jnp.int32)
    for t in range(6):
        logits, changed = model.apply({"params": params, "cache": cache}, prefix, last, t,
                                      method=CaptionDecoder.step, mutable=["cache"])
        cache = changed["cache"]
        np.testing.assert_allclose(logits, full[:, t], atol=1e-5, err_msg=f"position {t}")
        if t < 5:
            last = tokens[:, t]


@pytest.mark.slow
def test_greedy_is_argmax_and_beam_search_finds_the_best_sequence():
    config = _small(vocab=6, length=4)
    params = init_params(config, jax.random.key(3))
    # Larger weights make the distributions peaked and different from one prefix to another.
    params = jax.tree.map(lambda p: p * 6.0, params)
    rng = np.random.default_rng(1)
    prefixes = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    greedy = np.asarray(captioner.generate(params, config, prefixes, 1, EOT))
    for b in range(4):
        ids: list[int] = []
        for _ in range(4):  # argmax step by step with the full forward pass; padding after the end
            if EOT in ids:
                ids.append(0)
                continue
            tokens = jnp.asarray([ids], jnp.int32).reshape(1, len(ids))
            logits = CaptionDecoder(config).apply({"params": params}, prefixes[b][None], tokens)[0, -1]
            ids.append(int(np.argmax(logits)))
        np.testing.assert_array_equal(greedy[b], ids)
    # With as many beams as there are sequences (781 end where they may), beam search prunes
    # nothing: it must find the sequence of highest mean log-probability among all of them.
    beam = np.asarray(captioner.generate(params, config, prefixes, 6**4, EOT))
    seqs = np.array([q for q in itertools.product(range(6), repeat=4)
                     if EOT not in q or not any(q[q.index(EOT) + 1:])])  # after the end only padding
    assert len(seqs) == 781
    for b in range(4):
        best = _mean_logprob(params, config, prefixes[b], seqs).max()
        got, = _mean_logprob(params, config, prefixes[b], beam[b][None])
        assert got == pytest.approx(best, abs=1e-4)
        assert got >= _mean_logprob(params, config, prefixes[b], greedy[b][None])[0] - 1e-5


def test_memory_projection():
    # A known case: an orthonormal memory; a query on one row comes back as that row when the
    # temperature is small, and as the (normalised) mean of the rows when it is large.
    memory = jnp.eye(4)[:3]
    query = jnp.asarray([[2.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(captioner.project_to_memory(query, memory, 0.01), [[1, 0, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(captioner.project_to_memory(query, memory, 1e6), [[3**-0.5] * 3 + [0]], atol=1e-5)
    # softmax(q . m / T) with q . m = (1, 0, 0) at T = 1: weights e/(e+2), 1/(e+2), 1/(e+2).
    w = np.array([np.e, 1, 1]) / (np.e + 2)
    np.testing.assert_allclose(captioner.project_to_memory(query, memory, 1.0)[0, :3], w / np.linalg.norm(w),
                               atol=1e-6)
    # DeCap's formula on random data, and chunking changes nothing.
    rng = np.random.default_rng(0)
    q, m = rng.standard_normal((37, 8)), rng.standard_normal((50, 8))
    qn, mn = q / np.linalg.norm(q, axis=1, keepdims=True), m / np.linalg.norm(m, axis=1, keepdims=True)
    s = qn @ mn.T / 0.05
    weights = np.exp(s - s.max(1, keepdims=True))
    want = (weights / weights.sum(1, keepdims=True)) @ mn
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    for chunk in (1, 8, 1024):
        np.testing.assert_allclose(captioner.project_to_memory(jnp.asarray(q), jnp.asarray(m), 0.05, chunk=chunk),
                                   want, atol=1e-5)


def test_target_mask_keeps_the_end_token_and_a_zero_id_inside_the_caption():
    tokens = jnp.asarray([[49406, 0, 320, 49407, 0, 0]])  # id 0 is "!" inside the caption, padding after
    np.testing.assert_array_equal(decap.target_mask(tokens, 49407), [[True, True, True, True, False, False]])
    np.testing.assert_array_equal(decap.target_mask(tokens, 49407, nonzero=True),  # DeCap's
                                  [[True, False, True, True, False, False]])


CORPUS = [
    "a red coat with a logo at the chest.",
    "blue slim jeans in cotton denim.",
    "a green skirt with a hang tag at the hem.",
    "black leather boots, lace-up front.",
    "white shirt in linen, button front!",
    "a yellow dress with a care label at the neck.",
    "grey wool sweater with ribbed cuffs.",
    "pink silk scarf with a printed logo.",
]


def test_decoder_learns_to_write_captions_back_from_their_embeddings(trained_tiny):
    from e2_jax.data.tokenizer import CLIPTokenizer
    from e2_jax.inference import Encoder

    workdir, _ = trained_tiny
    encoder = Encoder.from_workdir(workdir, batch_size=8)
    embeddings = encoder.encode_texts(CORPUS)
    config = DecoderConfig(prefix_dim=embeddings.shape[1], width=64, layers=2, heads=2, max_length=24)
    tokenizer = CLIPTokenizer(config.max_length)
    settings = decap.TrainSettings(steps=200, batch_size=8, lr=3e-3, warmup_steps=20, log_every=1000)
    tokens = tokenizer(CORPUS)
    vocab = decap.corpus_vocabulary(tokens, tokenizer)  # the decoder writes only these CLIP ids
    assert vocab[0] == 0 and tokenizer.eot_id in vocab and len(vocab) < 80
    config = dataclasses.replace(config, vocab_size=len(vocab))
    params, losses = decap.train_decoder(config, embeddings, np.searchsorted(vocab, tokens), settings,
                                              int(np.searchsorted(vocab, tokenizer.eot_id)), log=lambda m: None)
    assert losses[-1] < 0.05 < losses[0]
    greedy = captioner.caption_embeddings(params, config, embeddings, tokenizer, vocab, beam_size=1, batch_size=8)
    beam = captioner.caption_embeddings(params, config, embeddings, tokenizer, vocab, beam_size=3, batch_size=8)
    want = [t.lower() for t in CORPUS]  # CLIP's tokenizer lower-cases
    assert greedy == want and beam == want


def test_detokenize_reattaches_punctuation():
    from e2_jax.data.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer()
    for text in ["slim-fit coat, 100% wool.", "women's t-shirt (cotton/linen): ribbed cuffs!", "a/b test?"]:
        spaced = tokenizer.decode(tokenizer(text)[0])
        assert spaced != text and captioner.detokenize(spaced) == text


@pytest.mark.slow
def test_metrics_are_the_standard_ones():
    nltk_bleu = pytest.importorskip("nltk.translate.bleu_score")
    refs = ["A red coat with a logo at the chest.", "Blue slim-fit jeans in cotton denim.",
            "A green skirt, hang tag at the hem.", "Black leather boots with a lace-up front."]
    cands = ["a red coat with logo at chest", "blue jeans in denim", "a green skirt with a tag at the hem",
             "black boots with lace-up front"]
    got = caption_metrics.score(refs, cands)
    # BLEU@4 as an independent implementation computes it on the same (PTB) tokens.
    ref_tokens = caption_metrics.tokenize({i: [r] for i, r in enumerate(refs)})
    cand_tokens = caption_metrics.tokenize({i: [c] for i, c in enumerate(cands)})
    want = nltk_bleu.corpus_bleu([[ref_tokens[i][0].split()] for i in range(4)],
                                 [cand_tokens[i][0].split() for i in range(4)])
    assert got["BLEU@4"] == pytest.approx(want, rel=1e-6)
    # ROUGE-L: F-measure of the longest common subsequence, beta 1.2, averaged over captions.
    def lcs(a, b):
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, j in itertools.product(range(len(a)), range(len(b))):
            table[i + 1][j + 1] = table[i][j] + 1 if a[i] == b[j] else max(table[i][j + 1], table[i + 1][j])
        return table[-1][-1]
    rouge = []
    for i in range(4):
        c, r = cand_tokens[i][0].split(), ref_tokens[i][0].split()
        p, rec = lcs(c, r) / len(c), lcs(c, r) / len(r)
        rouge.append((1 + 1.2**2) * p * rec / (rec + 1.2**2 * p))
    assert got["ROUGE-L"] == pytest.approx(np.mean(rouge), rel=1e-6)
    # Known answers: captions equal to their (distinct) references.
    same = caption_metrics.score(refs, refs)
    assert same["BLEU@4"] == pytest.approx(1.0, abs=1e-6) and same["ROUGE-L"] == pytest.approx(1.0)
    assert same["CIDEr"] == pytest.approx(10.0, abs=1e-6) and same["METEOR"] > 0.95
    assert 0 < got["METEOR"] < same["METEOR"] and 0 < got["CIDEr"] < 10
    assert set(got) == set(caption_metrics.METRICS)
    # An empty caption is scored (zero), not a hang.
    empty = caption_metrics.score(refs[:2], ["", cands[1]])
    assert 0 <= empty["BLEU@1"] < got["BLEU@1"] + 1


def _command(*args: str) -> str:
    from tests.processes import ROOT

    env = os.environ | {"XLA_FLAGS": xla_flags()}
    done = subprocess.run([sys.executable, "-m", "e2_jax.captioning", *args], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-6000:]
    return done.stdout


def test_captioning_command_end_to_end(synth_tiny, trained_tiny, tmp_path):
    from PIL import Image

    workdir, _ = trained_tiny
    out = tmp_path / "decap"
    flags = [f"--config=configs/decap.py:encoder={workdir},dataset=synth_fashion/tiny,runlocal",
             f"--config.data_dir={synth_tiny}", f"--workdir={out}"]
    _command(*flags, "--mode=train")
    assert (out / "decoder" / "config.json").is_file() and (out / "memory.npz").is_file()
    losses = [json.loads(line)["caption_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 50 and losses[-1] < losses[0]
    _command(*flags, "--mode=evaluate")
    report = json.loads((out / "report.json").read_text())
    assert report["products"] == 16 and set(report["metrics"]) == {"greedy", "beam2"}
    assert set(report["metrics"]["greedy"]) == set(caption_metrics.METRICS)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["reference"] and isinstance(r["greedy"], str) for r in rows)
    # The page: the scores, then 8 products' images with their reference and captions.
    page = (out / "report.html").read_text()
    assert "<td>greedy</td>" in page and page.count("<img ") == 8 and report["page_seconds"] < 30
    for row in rows[:8]:
        assert html.escape(f"reference: {row['reference']}") in page and html.escape(f"beam2: {row['beam2']}") in page
    assert images_loaded(page, tmp_path) == (8, 8)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    (images / "notes.jpg").write_text("not an image")  # skipped and named; the others captioned
    output = _command(*flags, "--mode=caption", f"--images={images}", f"--out={tmp_path / 'caps.jsonl'}")
    assert "captioned 3 images; skipped 1 unreadable" in output and f"skipped {images / 'notes.jpg'}" in output
    caps = [json.loads(line) for line in (tmp_path / "caps.jsonl").read_text().splitlines()]
    assert [Path(c["image"]).name for c in caps] == ["0.png", "1.png", "2.png"]
    assert all(isinstance(c["caption"], str) for c in caps)


def test_a_corpus_smaller_than_a_batch_and_a_run_shorter_than_its_warmup():
    config = _small(vocab=8, length=4)
    tokens = np.array([[1, 2, EOT, 0], [3, EOT, 0, 0], [4, 4, 4, EOT]])
    settings = decap.TrainSettings(steps=3, batch_size=8, warmup_steps=100, log_every=100)
    _, losses = decap.train_decoder(config, np.random.default_rng(0).standard_normal((3, 6)), tokens, settings,
                                         EOT, log=lambda m: None)
    assert len(losses) == 3 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="more than the decoder's max_length"):
        decap.train_decoder(config, np.ones((3, 6)), np.zeros((3, 5), int), settings, EOT)
