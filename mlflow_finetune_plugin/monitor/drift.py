"""Drift: how far the requests a version serves are from the questions it was trained on.

A request's similarity to the training data is the BM25 score of its nearest training question divided by the score
the request would get against itself (its own words weighed by the training data's idf, a word the training data
never has at the highest idf): the share of what the request says that the nearest training question matches. A
request is *new* when that share is lower than all but `monitor.novelty_quantile` of the training questions reach
against their own nearest neighbour (each left out in turn): the training data calibrates what "near" means for its
own vocabulary. New
requests are grouped (TF-IDF, average-linkage clustering on cosine distance) into topics the training data does not
cover, each named by its top words. Length and language (py3langid, on questions of three words or more) are
compared with the training questions too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

MIN_TRAIN = 10          # fewer training questions calibrate nothing
CLUSTER_SAMPLE = 2000   # new requests clustered at most (a random, seeded sample above it)
CLUSTER_DISTANCE = 0.8  # cosine distance under which two groups of new requests merge
MIN_WORDS_FOR_LANGUAGE = 3


@dataclass
class Novelty:
    """The training questions indexed, with the similarity under which a request counts as new."""

    questions: list[str]
    threshold: float
    retriever: object
    idf: dict[str, float]
    unseen_idf: float                    # the idf of a word no training question has
    mean_words: float
    language: str | None                 # the training questions' main language
    mean_chars: float

    def scores(self, texts: list[str]) -> list[float]:
        """Each text's BM25 similarity to its nearest training question (0 for a text with no indexed word)."""
        import numpy as np

        if not texts:
            return []
        tokens = _tokens(texts)
        out = np.zeros(len(texts))
        asked = [i for i, t in enumerate(tokens) if t]
        if asked:
            _, scores = self.retriever.retrieve([tokens[i] for i in asked], k=1, show_progress=False, n_threads=1)
            out[asked] = scores[:, 0] / np.array([self.own_score(tokens[i]) for i in asked])
        return out.tolist()

    def own_score(self, words: list[str]) -> float:
        """BM25 of `words` against themselves as a document (bm25s' Lucene formula and defaults)."""
        k1, b = 1.5, 0.75
        norm = k1 * (1 - b + b * len(words) / self.mean_words)
        return sum(self.idf.get(w, self.unseen_idf) * n * (k1 + 1) / (n + norm) for w, n in Counter(words).items())

    def is_new(self, texts: list[str]) -> list[bool]:
        return [s < self.threshold for s in self.scores(texts)]


@dataclass
class Topic:
    """A group of new requests: its size, its top words, and the requests in it (their indices)."""

    size: int
    words: list[str]
    members: list[int] = field(default_factory=list)


def calibrate(questions: list[str], quantile: float) -> Novelty | None:
    """The index of `questions` and its threshold; None for fewer than MIN_TRAIN questions with words."""
    import bm25s
    import numpy as np

    questions = [q for q in questions if q.strip()]
    tokens = _tokens(questions)
    kept = [q for q, t in zip(questions, tokens) if t]
    tokens = [t for t in tokens if t]
    if len(kept) < MIN_TRAIN:
        return None
    retriever = bm25s.BM25()
    retriever.index(tokens, show_progress=False)
    n, df = len(tokens), Counter(w for t in tokens for w in set(t))
    idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}
    novelty = Novelty(kept, 0.0, retriever, idf, math.log(1 + (n + 0.5) / 0.5), float(np.mean([len(t) for t in tokens])),
                      main_language(kept), float(np.mean([len(q) for q in kept])))
    # Each question's nearest *other* question: the best of the top two that is not itself.
    found, scores = retriever.retrieve(tokens, k=2, show_progress=False, n_threads=1)
    nearest = np.where(found[:, 0] == np.arange(n), scores[:, 1], scores[:, 0])
    nearest = nearest / np.array([novelty.own_score(t) for t in tokens])
    # A floor above zero: a request sharing no word with the training questions is new whatever the quantile says.
    novelty.threshold = max(float(np.quantile(nearest, quantile)), 1e-9)
    return novelty


def language_of(text: str) -> str | None:
    """The language of `text` (ISO 639-1), or None when it is too short to tell."""
    import py3langid

    if len(text.split()) < MIN_WORDS_FOR_LANGUAGE:
        return None
    return py3langid.classify(text)[0]


def main_language(texts: list[str]) -> str | None:
    counts = Counter(lang for t in texts if (lang := language_of(t)))
    return counts.most_common(1)[0][0] if counts else None


def topics(texts: list[str], seed: int = 0, most: int = 5, min_size: int = 2) -> list[Topic]:
    """The largest groups of `texts` (the new requests' questions) by topic, largest first."""
    import numpy as np
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.feature_extraction.text import TfidfVectorizer

    index = list(range(len(texts)))
    if len(index) > CLUSTER_SAMPLE:
        index = sorted(np.random.default_rng(seed).choice(len(texts), CLUSTER_SAMPLE, replace=False).tolist())
    try:
        vectorizer = TfidfVectorizer(stop_words="english", min_df=1)
        matrix = vectorizer.fit_transform([texts[i] for i in index])
    except ValueError:  # no word left (every text stopwords only)
        return []
    rows = np.flatnonzero(matrix.getnnz(axis=1) > 0)
    if len(rows) < min_size:
        return []
    if len(rows) == 1:
        labels = np.zeros(1, dtype=int)
    else:
        labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                         distance_threshold=CLUSTER_DISTANCE).fit_predict(matrix[rows].toarray())
    vocabulary = vectorizer.get_feature_names_out()
    found = []
    for label, size in Counter(labels.tolist()).most_common():
        if size < min_size or len(found) == most:
            break
        members = rows[labels == label]
        weights = np.asarray(matrix[members].mean(axis=0)).ravel()
        words = [str(vocabulary[i]) for i in np.argsort(-weights)[:4] if weights[i] > 0]
        found.append(Topic(int(size), words, [index[i] for i in members]))
    return found


def _tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
