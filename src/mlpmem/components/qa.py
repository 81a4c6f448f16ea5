"""Corpus-knowledge QA: cloze items mined from a corpus's own documents, their metrics, and their lm-eval task.

An item is a (prompt, answer) pair whose answer is a factual span of a document (a number: a year, a count, an
amount; or a name: a capitalised run of words that does not open its sentence) and whose prompt is the text that
leads to it: the document's first sentence (its topic), then the answer's sentence up to the answer. The answer
must not occur in the prompt, so it cannot be copied from it. Items drawn from train documents test recall of
what the datastore and the memory hold; items from test documents are a control nobody holds.

The model continues the prompt greedily; the continuation runs on past the answer (it is a sentence, not a short
answer), so the prediction is its first n words, n the answer's word count, after normalising both as SQuAD-style
QA does (lower case, no punctuation or articles). Exact match and token F1 compare those words.

Everything here is deterministic given the documents and the seed; nothing knows the run directory.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

# A sentence ends at . ! or ? followed by space and an opening capital, digit, quote or bracket.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
_NUMBER = re.compile(r"(?<![\w.,/-])(?:\d{1,3}(?:,\d{3})+|\d{2,})(?:\.\d+)?(?![\w/-]|[.,]\d)")
_CAP = r"[A-ZÀ-ÖØ-Þ][^\W\d_]*[^\W\d_A-ZÀ-ÖØ-Þ][^\W\d_]*"  # a capitalised word with a lower-case letter (not "USA")
_NAME = re.compile(rf"(?<![\w-]){_CAP}(?:[ -](?:{_CAP}|(?:of|de|von|van|der|da|al|du|la|le)(?= [A-ZÀ-ÖØ-Þ])))*(?![\w-])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation + "–—‘’“”")  # noqa: RUF001


@dataclass(frozen=True)
class Item:
    id: str          # "<split>-<document>-<char offset>"
    split: str       # the prepared split the document comes from: train (held in) or test (held out)
    doc: int         # the document's index in its split
    kind: str        # number | name
    prompt: str      # ends without whitespace
    target: str      # the text the model should continue with: the whitespace before the answer, then the answer
    answer: str

    def to_json(self) -> dict:
        return asdict(self)


def sentences(text: str) -> list[tuple[int, str]]:
    """(start offset, sentence) of each sentence of a document."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        out.append((start, text[start:m.start()]))
        start = m.end()
    if text[start:].strip():
        out.append((start, text[start:]))
    return out


def candidate_spans(sentence: str, kinds, min_prompt_words: int) -> list[tuple[int, int, str]]:
    """(start, end, kind) of the answer spans of one sentence, after at least ``min_prompt_words`` words."""
    spans = []
    if "number" in kinds:
        spans += [(m.start(), m.end(), "number") for m in _NUMBER.finditer(sentence)]
    if "name" in kinds:
        spans += [(m.start(), m.end(), "name") for m in _NAME.finditer(sentence) if m.start() > 0]
    return sorted(s for s in spans if len(sentence[:s[0]].split()) >= min_prompt_words)


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def _contains(prompt: str, answer: str) -> bool:
    p, a = f" {normalize(prompt)} ", f" {normalize(answer)} "
    return a.strip() == "" or a in p


def document_items(text: str, split: str, doc: int, kinds, min_prompt_words: int) -> list[Item]:
    """Every eligible item of one document (answers absent from their prompt, text ending mid-sentence excluded)."""
    text = text.strip()
    sents = sentences(text)
    if not sents:
        return []
    lead = sents[0][1].strip()
    items = []
    for i, (offset, sent) in enumerate(sents):
        for start, end, kind in candidate_spans(sent, kinds, min_prompt_words):
            head = sent[:start]
            stripped = head.rstrip()
            prefix = "" if i == 0 else lead + " "
            prompt, target = prefix + stripped, head[len(stripped):] + sent[start:end]
            if not stripped or _contains(prompt, sent[start:end]):
                continue
            items.append(Item(f"{split}-{doc}-{offset + start}", split, doc, kind, prompt, target, sent[start:end]))
    return items


def mine_items(docs: list[str], split: str, n: int, per_doc: int, kinds, min_prompt_words: int,
               seed: int, keep: Callable[[Item], bool] | None = None) -> list[Item]:
    """Up to ``n`` items from ``docs``, at most ``per_doc`` per document, drawn with a seeded generator and
    returned in document order (the same documents and seed give the same items); ``keep`` filters candidates
    (e.g. by length)."""
    rng = np.random.default_rng([seed, {"train": 0, "validation": 1, "test": 2}.get(split, 3)])
    pool = []
    for d, text in enumerate(docs):
        cands = [it for it in document_items(text, split, d, kinds, min_prompt_words) if keep is None or keep(it)]
        if cands:
            pick = rng.choice(len(cands), size=min(per_doc, len(cands)), replace=False)
            pool += [cands[j] for j in sorted(pick)]
    if len(pool) > n:
        pool = [pool[j] for j in sorted(rng.choice(len(pool), size=n, replace=False))]
    return pool


# ----------------------------------------------------------------------------- metrics

def prediction(continuation: str, answer: str) -> str:
    """What a greedy continuation answers: its first n normalised words (cut at its first newline), n = the
    normalised answer's word count. Normalising first drops a leading article ("the Works" answers "Works")."""
    return " ".join(normalize(continuation.split("\n")[0]).split()[:len(normalize(answer).split())])


def exact_match(pred: str, answer: str) -> float:
    return float(normalize(pred) == normalize(answer))


def token_f1(pred: str, answer: str) -> float:
    p, a = normalize(pred).split(), normalize(answer).split()
    common = sum((Counter(p) & Counter(a)).values())
    if not p or not a or common == 0:
        return float(p == a)
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)


def process_results(doc: dict, results: list[str]) -> dict:
    """lm-eval's per-document scorer for the exported generation tasks (the same metrics as `mlpmem qa`)."""
    pred = prediction(results[0], doc["answer"])
    return {"exact_match": exact_match(pred, doc["answer"]), "f1": token_f1(pred, doc["answer"])}


def bootstrap_means(values: dict[str, np.ndarray], clusters: np.ndarray, pairs: list[tuple[str, str]],
                    samples: int = 1000, seed: int = 0) -> tuple[dict, dict]:
    """Means of per-item metrics with 95% intervals, and paired differences of means (a - b), resampling the
    clusters (documents) with replacement, the same draw for every system.

    values: system -> (n,) per-item metric; clusters: (n,) document of each item. Returns ({system: {mean, ci95}},
    {(a, b): {change, ci95, excludes_zero}}).
    """
    _, c = np.unique(clusters, return_inverse=True)
    C = int(c.max()) + 1 if c.size else 0
    size = np.bincount(c, minlength=C).astype(np.float64)
    sums = {s: np.bincount(c, weights=np.asarray(v, np.float64), minlength=C) for s, v in values.items()}
    W = np.random.default_rng(seed).multinomial(C, np.full(C, 1.0 / max(C, 1)), size=samples).astype(np.float64)
    n = np.maximum(W @ size, 1.0)
    boot = {s: (W @ v) / n for s, v in sums.items()}
    total = max(size.sum(), 1.0)
    ci = lambda x: [float(q) for q in np.percentile(x, [2.5, 97.5])]  # noqa: E731
    means = {s: {"mean": float(v.sum() / total), "ci95": ci(boot[s])} for s, v in sums.items()}
    diffs = {}
    for a, b in pairs:
        lo, hi = ci(boot[a] - boot[b])
        diffs[(a, b)] = {"change": means[a]["mean"] - means[b]["mean"], "ci95": [lo, hi],
                         "excludes_zero": bool(lo > 0 or hi < 0)}
    return means, diffs


# ----------------------------------------------------------------------------- lm-eval export

SIDES = {"train": "heldin", "test": "heldout"}


def lm_eval_tasks(items: list[Item], name: str, max_new_tokens: int) -> dict[str, str]:
    """The items as lm-eval tasks, {file name: text}: per side (held-in, held-out) a generation task scored by
    :func:`process_results` (exact match, F1) and a log-likelihood task (`loglik`: the mean log-likelihood of the
    answer, what `mlpmem qa` reports; `acc`: whether greedy decoding gives the answer token for token; lm-eval's
    default `perplexity` there would be exp(-mean answer log-likelihood), a per-answer, not per-token, quantity, so
    it is not declared); all tagged ``name``, with ``metadata.version`` (bump it when the tasks change). Data files
    resolve against the folder they are written to (pass it to lm-eval as --include_path)."""
    version = "1.0"
    files: dict[str, str] = {"utils.py": "# lm-eval loads the scorers from here; they are mlpmem's own.\n"
                                         "from mlpmem.components.qa import process_results  # noqa: F401\n\n\n"
                                         "def process_loglik(doc, results):\n"
                                         "    (ll, is_greedy), = results\n"
                                         "    return {\"loglik\": ll, \"acc\": float(is_greedy)}\n"}
    for split, side in SIDES.items():
        rows = [it.to_json() for it in items if it.split == split]
        if not rows:
            continue
        data = f"{name}_{side}.jsonl"
        files[data] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        common = (f"tag: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {{DIR}}/{data}\n"
                  "test_split: test\ntarget_delimiter: \"\"\ndoc_to_text: \"{{prompt}}\"\n"
                  f"metadata:\n  version: {version}\n")
        files[f"{name}_{side}.yaml"] = (
            f"task: {name}_{side}\n" + common + "doc_to_target: \"{{answer}}\"\noutput_type: generate_until\n"
            f"generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: {max_new_tokens}\n  do_sample: false\n"
            "process_results: !function utils.process_results\nmetric_list:\n"
            "  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n"
            "  - {metric: f1, aggregation: mean, higher_is_better: true}\n")
        files[f"{name}_{side}_loglik.yaml"] = (
            f"task: {name}_{side}_loglik\n" + common + "doc_to_target: \"{{target}}\"\noutput_type: loglikelihood\n"
            "process_results: !function utils.process_loglik\nmetric_list:\n"
            "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
            "  - {metric: loglik, aggregation: mean, higher_is_better: true}\n")
    return files


def write_lm_eval_tasks(folder: Path, items: list[Item], name: str, max_new_tokens: int) -> list[Path]:
    """Write :func:`lm_eval_tasks` into ``folder`` (data paths made absolute), atomically per file."""
    from mlpmem.files import atomic_write_text

    folder = Path(folder).absolute()
    paths = []
    for fname, text in lm_eval_tasks(items, name, max_new_tokens).items():
        path = folder / fname
        atomic_write_text(path, text.replace("{DIR}", str(folder)) if fname.endswith(".yaml") else text)
        paths.append(path)
    return paths
