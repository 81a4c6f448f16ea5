"""Retrieval-augmented generation, the baseline the memory is measured against: BM25 over a corpus's passages.

- :func:`passages`: documents cut into passages of about ``words`` words, whole sentences packed together (a
  sentence longer than that is cut), so an answer rarely straddles two passages. Every passage after a document's
  first opens with the document's first sentence, its title (as retrieval corpora of Wikipedia prefix the article
  title): "It was founded in 1842" is found, and understood, only next to what "it" is.
- :class:`BM25Index`: the passages indexed with ``bm25s`` (lower case, English stop words, no stemming); a query is
  the question's prompt text, the answer the ids of its top-k passages (those sharing no term with it left out).
- :func:`rag_prompt`: the passages (best first, one a line), a blank line, then the prompt, the passages cut from
  their end until prompt + answer + the decoded tokens fit the model's window; the prompt is always whole.

Nothing here knows the run directory; the index is rebuilt per QA run, not cached (on 2 busy CPU cores: 0.3 s
for 200k words, the demo's train split is smaller; 16 s for 10M words, and 480 queries in 0.2 s and 9 s).
"""

from __future__ import annotations

import numpy as np

from mlpmem.components.qa import sentences

STOPWORDS = "en"
SEP = "\n\n"  # between the passages and the prompt


def passages(docs: list[str], words: int) -> tuple[list[str], np.ndarray]:
    """(passages, (P,) int64 document of each): each document's sentences packed in order into runs of at most
    ``words`` words (a longer sentence is cut into ``words``-word pieces), each run after the document's first
    led by the document's first sentence (at most ``words`` words of it). Empty documents give none."""
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    out, owner = [], []
    for d, text in enumerate(docs):
        sents = sentences(text.strip())
        start = len(out)
        cur: list[str] = []
        for _, sent in sents:
            ws = sent.split()
            while len(ws) > words:  # a sentence longer than a passage: cut it
                if cur:
                    out.append(" ".join(cur))
                    owner.append(d)
                    cur = []
                out.append(" ".join(ws[:words]))
                owner.append(d)
                ws = ws[words:]
            if cur and len(cur) + len(ws) > words:
                out.append(" ".join(cur))
                owner.append(d)
                cur = []
            cur += ws
        if cur:
            out.append(" ".join(cur))
            owner.append(d)
        if len(out) > start + 1:
            title = " ".join(sents[0][1].split()[:words])
            out[start + 1:] = [f"{title} {p}" for p in out[start + 1:]]
    return out, np.asarray(owner, dtype=np.int64)


class BM25Index:
    """BM25 (bm25s' defaults: Lucene scoring, k1 1.5, b 0.75) over ``texts``."""

    def __init__(self, texts: list[str]) -> None:
        try:
            import bm25s
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("the RAG baseline (--qa.rag) needs bm25s: pip install bm25s") from e
        if not texts:
            raise ValueError("no passages to index: the corpus is empty")
        self._bm25s = bm25s
        self.texts = texts
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(texts, stopwords=STOPWORDS, show_progress=False), show_progress=False)

    def __len__(self) -> int:
        return len(self.texts)

    def search(self, queries: list[str], k: int) -> list[list[int]]:
        """The ids of each query's top-``k`` passages, best first, leaving out those scoring 0 (no shared term)."""
        if not queries:
            return []
        k = min(k, len(self.texts))  # bm25s refuses k above the corpus size
        q = self._bm25s.tokenize(queries, stopwords=STOPWORDS, show_progress=False)
        ids, scores = self.retriever.retrieve(q, k=k, show_progress=False)
        return [[int(i) for i, s in zip(row, srow) if s > 0] for row, srow in zip(ids, scores)]


def rag_prompt(tokenizer, texts: list[str], prompt: str, target: str, room: int) -> tuple[str, int]:
    """(prompt with the passages before it, passages kept): ``texts`` one a line, a blank line, then ``prompt``,
    the passages cut from their end (the lowest-ranked first) so that ``prompt + target`` tokenizes to at most
    ``room`` tokens; ``prompt`` alone when no passage fits."""
    n_tok = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    block = "\n".join(t.strip() for t in texts if t.strip())
    if not block:
        return prompt, 0
    full = block + SEP + prompt
    over = n_tok(full + target) - room
    if over <= 0:
        return full, len(texts)
    ids = tokenizer(block, add_special_tokens=False)["input_ids"]
    keep = len(ids) - over
    while keep > 0:  # decoding a cut and encoding it again may merge tokens differently: check, cut again
        cut = tokenizer.decode(ids[:keep]).rstrip().rstrip("\ufffd").rstrip()  # no half character at the cut
        over = n_tok(cut + SEP + prompt + target) - room if cut else 0
        if cut and over <= 0:
            return cut + SEP + prompt, cut.count("\n") + 1
        keep -= max(over, 1)
    return prompt, 0
