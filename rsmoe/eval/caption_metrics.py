"""Caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when possible) via pycocoevalcap.

Everything runs offline. pycocoevalcap needs Java for the PTB tokenizer, METEOR and SPICE:

* no Java (or a JVM that does not start): METEOR is reported unavailable with the reason, the
  captions are tokenised by :func:`simple_ptb_tokenize` (a pure-Python imitation of the PTB
  tokenizer as pycocoevalcap runs it) and BLEU / ROUGE-L / CIDEr are still computed. The
  tokenizer used is recorded in :attr:`CaptionScores.tokenizer`, because numbers from the two
  tokenisers are close but not guaranteed identical.
* SPICE needs the Stanford CoreNLP 3.6.0 jars, which pycocoevalcap downloads on first use. We
  only look for the files and never trigger that download; without them SPICE is unavailable.

Set ``RSMOE_EVAL_NO_JAVA=1`` (or pass ``java=False``) to simulate a machine without Java.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

BLEU_NAMES = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4")
METRIC_NAMES = (*BLEU_NAMES, "METEOR", "ROUGE-L", "CIDEr", "SPICE")
NO_JAVA_ENV = "RSMOE_EVAL_NO_JAVA"
JAVA_HELP = (
    "install a Java runtime (e.g. `apt-get install default-jre-headless`, or any JRE >= 8) "
    "and make sure `java` is on PATH"
)
SPICE_OFFLINE_REASON = "CoreNLP 3.6.0 models not available offline"
TOKENIZER_PTB = "ptb (Stanford PTBTokenizer via pycocoevalcap)"
TOKENIZER_FALLBACK = "python-ptb-approx (Java unavailable; see simple_ptb_tokenize)"


@dataclass
class CaptionScores:
    """Corpus and per-image caption scores.

    ``corpus`` holds the metrics that could be computed (raw pycocoevalcap scale: BLEU/METEOR/
    ROUGE-L in [0, 1], CIDEr usually in [0, ~10]); ``unavailable`` maps every metric that could
    not be computed to the reason. ``per_image`` maps metric -> image id -> score, in ``ids``
    order. The tokenised captions and BLEU sufficient statistics are kept for bootstrapping.
    """

    corpus: dict[str, float]
    per_image: dict[str, dict[str, float]]
    unavailable: dict[str, str]
    tokenizer: str
    ids: list[str]
    tokenized_candidates: dict[str, str] = field(repr=False)
    tokenized_references: dict[str, list[str]] = field(repr=False)
    # Rows follow ``ids``: testlen, closest reflen, guess_1..4, correct_1..4 (see bleu_statistics).
    bleu_stats: np.ndarray = field(repr=False)
    notes: list[str] = field(default_factory=list)
    bootstrap_cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    """Per-resample corpus scores already computed (the grounding control's paired bootstrap reuses them)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (per-image scores included, bootstrap internals left out)."""
        return {
            "metrics": dict(self.corpus),
            "unavailable": dict(self.unavailable),
            "tokenizer": self.tokenizer,
            "notes": list(self.notes),
            "n_images": len(self.ids),
            "per_image": {m: dict(v) for m, v in self.per_image.items()},
        }


# --------------------------------------------------------------------------- Java detection


@lru_cache(maxsize=None)
def _probe_java(java_path: str) -> tuple[bool, str]:
    try:
        proc = subprocess.run(
            [java_path, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"`{java_path} -version` failed to run ({exc}); {JAVA_HELP}"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"the JVM at {java_path} does not start ({tail[0]}); {JAVA_HELP}"
    return True, ""


def java_status(java: bool | None = None) -> tuple[bool, str]:
    """Whether Java can run pycocoevalcap's jars, and the reason if not.

    ``java=False`` or the environment variable ``RSMOE_EVAL_NO_JAVA=1`` simulate a machine
    without Java (for tests and for forcing the pure-Python path); ``java=True`` skips the probe.
    """
    if java is False or os.environ.get(NO_JAVA_ENV, "").strip() not in ("", "0"):
        return False, f"Java disabled (java=False or {NO_JAVA_ENV} set); to enable it, {JAVA_HELP}"
    if java is True:
        return True, ""
    path = shutil.which("java")
    if path is None:
        return False, f"`java` was not found on PATH; {JAVA_HELP}"
    return _probe_java(path)


# --------------------------------------------------------------------------- tokenisation

# pycocoevalcap drops these tokens after PTB tokenisation. Its list has upper-case -LRB- etc.
# while the tokenizer runs with -lowerCase, so brackets survive as "-lrb-"/"-rrb-"; we mimic that.
_PTB_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_TOKEN_RE = re.compile(
    r"""
    \d+(?:[.,:/]\d+)+            # 1,000  3.5  10:30 stay one token, as in PTB
  | (?:[^\W_]\.){2,}             # abbreviations such as u.s.
  | n't | '(?:s|re|ve|ll|d|m)\b  # clitics split off by the contraction pass below
  | [^\W_]+(?:[-'&][^\W_]+)*      # words; hyphenated compounds stay whole (well-known)
  | \.\.\. | -- | \S             # remaining punctuation, one token each
    """,
    re.VERBOSE,
)


def simple_ptb_tokenize(text: str) -> str:
    """Pure-Python stand-in for pycocoevalcap's PTB tokenisation (used only without Java).

    Rules: lower-case; newlines become spaces; contractions split like PTB (``don't`` -> ``do
    n't``, ``river's`` -> ``river 's``); numbers with separators (``1,000``, ``3.5``), dotted
    abbreviations (``u.s.``) and hyphenated words stay one token; brackets become ``-lrb-`` etc.
    (pycocoevalcap keeps those); the tokens pycocoevalcap removes (. , ? ! : ; - -- ... quotes)
    are dropped; tokens are joined by single spaces.
    """
    text = text.replace("\n", " ").lower()
    text = re.sub(r"(?<=\w)n't\b", " n't", text)
    text = re.sub(r"(?<=\w)'(s|re|ve|ll|d|m)\b", r" '\1", text)
    tokens = []
    for tok in _TOKEN_RE.findall(text):
        tok = _PTB_BRACKETS.get(tok, tok)
        if tok not in _PTB_DROP:
            tokens.append(tok)
    return " ".join(tokens)


def _tokenize(
    captions: Mapping[str, Sequence[str]], use_java: bool
) -> tuple[dict[str, list[str]], str, str]:
    """Tokenise ``{id: [caption, ...]}``; returns (tokenised, tokenizer label, failure note)."""
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        try:
            out = PTBTokenizer().tokenize(
                {k: [{"caption": c} for c in caps] for k, caps in captions.items()}
            )
            if all(len(out.get(k, [])) == len(caps) for k, caps in captions.items()):
                return out, TOKENIZER_PTB, ""
            failure = "PTBTokenizer returned fewer lines than captions"
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            failure = f"PTBTokenizer failed ({exc})"
        logger.warning("%s; falling back to the pure-Python tokenisation", failure)
    else:
        failure = ""
    return (
        {k: [simple_ptb_tokenize(c) for c in caps] for k, caps in captions.items()},
        TOKENIZER_FALLBACK,
        failure,
    )


# --------------------------------------------------------------------------- SPICE


def spice_jars() -> list[Path]:
    """The CoreNLP 3.6.0 jars SPICE needs, where pycocoevalcap expects them."""
    import pycocoevalcap

    lib = Path(list(pycocoevalcap.__path__)[0]) / "spice" / "lib"
    return [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]


def spice_status() -> tuple[bool, str]:
    """(available, reason): checks the jar files only; never triggers pycocoevalcap's download."""
    missing = [p.name for p in spice_jars() if not p.is_file()]
    if missing:
        return False, f"{SPICE_OFFLINE_REASON} (missing {', '.join(missing)} in {spice_jars()[0].parent})"
    return True, ""


# --------------------------------------------------------------------------- BLEU statistics


def bleu_statistics(gts: Mapping[str, list[str]], res: Mapping[str, list[str]], ids: Sequence[str]) -> np.ndarray:
    """Per-image BLEU sufficient statistics, exactly as pycocoevalcap's BleuScorer ('closest').

    Row i: [testlen, reflen, guess_1..4, correct_1..4]. Summing rows over any multiset of images
    and applying :func:`bleu_from_statistics` reproduces the corpus BLEU of that multiset.
    """
    from pycocoevalcap.bleu.bleu_scorer import cook_refs, cook_test

    rows = []
    for k in ids:
        comps = cook_test(res[k][0], cook_refs(gts[k]), eff="closest")
        rows.append([comps["testlen"], comps["reflen"], *comps["guess"], *comps["correct"]])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 10)


def bleu_from_statistics(totals: np.ndarray) -> np.ndarray:
    """Corpus BLEU-1..4 from summed statistics; ``totals`` has shape (..., 10).

    Same formula and smoothing constants as BleuScorer.compute_score, vectorised so bootstrap
    resamples cost one matrix product.
    """
    small, tiny = 1e-9, 1e-15
    testlen, reflen = totals[..., 0], totals[..., 1]
    guess, correct = totals[..., 2:6], totals[..., 6:10]
    prec = np.cumprod((correct + tiny) / (guess + small), axis=-1)
    bleus = prec ** (1.0 / np.arange(1, 5))
    ratio = (testlen + tiny) / (reflen + small)
    with np.errstate(divide="ignore", over="ignore"):
        bp = np.where(ratio < 1, np.exp(1 - 1 / np.where(ratio < 1, ratio, 1.0)), 1.0)
    return bleus * bp[..., None]


# --------------------------------------------------------------------------- main entry point


def _validate(candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    if not candidates:
        raise ValueError("no candidate captions to score")
    cand_ids, ref_ids = set(candidates), set(references)
    if cand_ids != ref_ids:
        only_c = sorted(map(str, cand_ids - ref_ids))
        only_r = sorted(map(str, ref_ids - cand_ids))
        raise ValueError(
            "candidate and reference ids differ: "
            f"{len(only_c)} id(s) without references {only_c[:5]}, "
            f"{len(only_r)} id(s) without a candidate {only_r[:5]}"
        )
    for k, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{k!r}] must be a non-empty list of strings")
    for k, c in candidates.items():
        if not isinstance(c, str):
            raise ValueError(f"candidates[{k!r}] must be a string, got {type(c).__name__}")
    return list(candidates)


def score_captions(
    candidates: dict[str, str],
    references: dict[str, list[str]],
    *,
    use_meteor: bool = True,
    use_spice: bool = False,
    java: bool | None = None,
    meteor: Any | None = None,
) -> CaptionScores:
    """Score one candidate caption per image against its references.

    Args:
        candidates: image id -> generated caption.
        references: image id -> reference captions (same ids as ``candidates``).
        use_meteor: compute METEOR (starts a JVM, ~5-15 s).
        use_spice: compute SPICE if the CoreNLP jars are already present (never downloads).
        java: ``None`` detects Java; ``False`` simulates its absence; ``True`` skips the probe.
        meteor: an already started ``pycocoevalcap.meteor.meteor.Meteor`` to reuse (the caller
            keeps ownership); otherwise one is started and closed here.

    Raises:
        ValueError: empty input, mismatched ids, or empty reference lists.
    """
    ids = _validate(candidates, references)
    java_ok, java_reason = java_status(java)
    if not java_ok:
        logger.warning("Java unavailable: %s. METEOR/SPICE skipped, Python tokenisation used.", java_reason)

    # Tokenise candidates and references in one JVM call, as pycocoevalcap's COCOEvalCap does.
    joined = {f"r\x00{k}": list(references[k]) for k in ids}
    joined.update({f"c\x00{k}": [candidates[k]] for k in ids})
    tok, tokenizer, tok_failure = _tokenize(joined, java_ok)
    gts = {k: tok[f"r\x00{k}"] for k in ids}
    res = {k: tok[f"c\x00{k}"] for k in ids}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    corpus: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {}
    unavailable: dict[str, str] = {}
    notes: list[str] = []
    if tok_failure:
        notes.append(f"{tok_failure}; used the pure-Python tokenisation")
    elif not java_ok:
        notes.append("tokenised without Java by simple_ptb_tokenize (approximates PTBTokenizer)")

    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    for n, name in enumerate(BLEU_NAMES):
        corpus[name] = float(bleu[n])
        per_image[name] = {k: float(s) for k, s in zip(ids, bleu_per[n])}

    if not use_meteor:
        unavailable["METEOR"] = "not requested (use_meteor=False)"
    elif not java_ok:
        unavailable["METEOR"] = f"needs Java: {java_reason}"
    else:
        try:
            score, scores = _meteor_score(gts, res, meteor)
            corpus["METEOR"] = float(score)
            per_image["METEOR"] = {k: float(s) for k, s in zip(ids, scores)}
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            logger.error("METEOR failed: %s", exc)
            unavailable["METEOR"] = f"METEOR jar failed ({exc}); check that `java -jar` works ({JAVA_HELP})"

    rouge, rouge_per = Rouge().compute_score(gts, res)
    corpus["ROUGE-L"] = float(rouge)
    per_image["ROUGE-L"] = {k: float(s) for k, s in zip(ids, rouge_per)}

    cider, cider_per = Cider().compute_score(gts, res)
    corpus["CIDEr"] = float(cider)
    per_image["CIDEr"] = {k: float(s) for k, s in zip(ids, cider_per)}
    if len(ids) == 1:
        notes.append("CIDEr is 0 for a single image: its IDF needs more than one reference set")

    spice_ok, spice_reason = spice_status()
    if not spice_ok:
        unavailable["SPICE"] = spice_reason
    elif not use_spice:
        unavailable["SPICE"] = "not requested (use_spice=False)"
    elif not java_ok:
        unavailable["SPICE"] = f"needs Java: {java_reason}"
    else:
        try:
            from pycocoevalcap.spice.spice import Spice

            score, scores = Spice().compute_score(gts, res)
            corpus["SPICE"] = float(score)
            per_image["SPICE"] = {k: float(s["All"]["f"]) for k, s in zip(sorted(ids), scores)}
            per_image["SPICE"] = {k: per_image["SPICE"][k] for k in ids}
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
            logger.error("SPICE failed: %s", exc)
            unavailable["SPICE"] = f"SPICE jar failed ({exc})"

    return CaptionScores(
        corpus=corpus,
        per_image=per_image,
        unavailable=unavailable,
        tokenizer=tokenizer,
        ids=ids,
        tokenized_candidates={k: res[k][0] for k in ids},
        tokenized_references=gts,
        bleu_stats=bleu_statistics(gts, res, ids),
        notes=notes,
    )


def _meteor_score(
    gts: Mapping[str, list[str]], res: Mapping[str, list[str]], meteor: Any | None
) -> tuple[float, list[float]]:
    from pycocoevalcap.meteor.meteor import Meteor

    if meteor is not None:
        return meteor.compute_score(gts, res)
    scorer = Meteor()
    try:
        return scorer.compute_score(gts, res)
    finally:
        # Close the JVM now rather than whenever the garbage collector runs Meteor.__del__.
        proc = scorer.meteor_p
        if proc.stdin:
            proc.stdin.close()
        proc.kill()
        proc.wait()
