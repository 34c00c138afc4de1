"""Caption metrics as captioning papers report them: the COCO caption evaluation code.

`score(references, candidates)` returns BLEU@1-4, METEOR, ROUGE-L and CIDEr (CIDEr-D, as the
COCO server computes it) in the usual scale (BLEU, METEOR, ROUGE-L in [0, 1]; CIDEr up to 10),
from `pycocoevalcap` (the COCO server's code, packaged on PyPI), after its PTB tokenizer. It is
what DeCap and the captioning papers E² compares with report, so the numbers are comparable;
its METEOR (1.5) and the tokenizer run in Java (a JRE: `apt-get install default-jre-headless`).

CIDEr's document frequencies come from the references scored together: a corpus-level metric,
meaningful over a whole split, not one caption. SPICE is left out (it downloads Stanford CoreNLP
on first use). The references and candidates are tokenized in one Java run, and METEOR's Java
process (about 5 s to start: it loads its paraphrase tables) is started once per Python process
and kept for the next `score` (each of its EVAL lines is scored on its own).
"""

from __future__ import annotations

import atexit
import functools
import shutil
from collections.abc import Sequence

METRICS = ("BLEU@1", "BLEU@2", "BLEU@3", "BLEU@4", "METEOR", "ROUGE-L", "CIDEr")


def _check_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need a Java runtime for the PTB tokenizer and METEOR "
                           "(pycocoevalcap runs Java): apt-get install default-jre-headless")


def tokenize(texts: dict[int, list[str]]) -> dict[int, list[str]]:
    """The PTB tokenizer of the COCO evaluation (lower case, punctuation removed)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check_java()
    return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})


@functools.cache
def _meteor():
    """METEOR's Java process, started on first use and closed at exit."""
    from pycocoevalcap.meteor.meteor import Meteor

    _check_java()
    meteor = Meteor()
    atexit.register(meteor.meteor_p.kill)
    return meteor


def score(references: Sequence[str] | Sequence[Sequence[str]], candidates: Sequence[str]) -> dict[str, float]:
    """Corpus scores of `candidates` against `references` (one string, or a list of strings,
    per candidate)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
    if not candidates:
        raise ValueError("no captions to score")
    count = len(candidates)  # one tokenizer run: candidate i under key count + i
    tokens = tokenize({i: [r] if isinstance(r, str) else list(r) for i, r in enumerate(references)}
                      | {count + i: [c] for i, c in enumerate(candidates)})
    refs, cands = {i: tokens[i] for i in range(count)}, {i: tokens[count + i] for i in range(count)}
    # An empty caption would make METEOR's Java process wait forever: score it as one unknown word.
    cands = {i: [c[0] if c[0].strip() else "<empty>"] for i, c in cands.items()}
    bleu, _ = Bleu(4).compute_score(refs, cands, verbose=0)
    out = {f"BLEU@{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["METEOR"] = float(_meteor().compute_score(refs, cands)[0])
    out["ROUGE-L"] = float(Rouge().compute_score(refs, cands)[0])
    out["CIDEr"] = float(Cider().compute_score(refs, cands)[0])
    return out


def table(scores: dict[str, dict[str, float]]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(header, rows): one row per decoding (greedy, beam...), METRICS in percent as papers print them."""
    return (("decoding", *METRICS), [
        (name, *(f"{100 * values[m]:.1f}" for m in METRICS)) for name, values in scores.items()])
