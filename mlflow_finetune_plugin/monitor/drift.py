"""Drift: how far the requests a version serves are from the questions it was trained on.

A request's similarity to the training data is the BM25 score of its nearest training question divided by the
score the request would get against itself (its own words weighed by the training data's idf, a word the
training data never has at the highest idf): the share of what the request says that the nearest training
question matches. A request is *new* when that share is lower than all but `monitor.novelty_quantile` of the
training questions reach against their own nearest neighbour (each left out in turn): the training data
calibrates what "near" means for its own vocabulary. With `monitor.embedding` (a sentence-transformers model),
the similarity is the cosine of sentence embeddings instead, calibrated the same way. New requests are grouped
(TF-IDF over the words two requests or more share, average-linkage clustering on cosine distance) into topics
the training data does not cover, each named by its top words; the rest are counted as "other". Length and
language (py3langid, on questions of three words or more) are compared with the training questions too.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from mlflow_finetune_plugin import retriever
from mlflow_finetune_plugin.errors import FinetuneError

MIN_TRAIN = 10          # fewer training questions calibrate nothing
CLUSTER_SAMPLE = 2000   # new requests clustered at most (a random, seeded sample above it)
CLUSTER_DISTANCE = 0.8  # cosine distance under which two groups of new requests merge
MIN_WORDS_FOR_LANGUAGE = 3
# Never a topic's word: scikit-learn's English stop words, and the function words it lacks ("does" named a
# topic of requests about a board game).
_FUNCTION_WORDS = ("does did doing doesn didn don isn aren wasn weren won wouldn shouldn couldn hasn haven "
                   "ok okay hi hello hey please thanks thank let lets want like just really know tell")


def _stop_words() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) | frozenset(_FUNCTION_WORDS.split())


class Lexical:
    """BM25 over the training questions (the package's one index, `retriever.bm25_index`), each score divided
    by the text's score against itself."""

    def __init__(self, tokens: list[list[str]]):
        import numpy as np

        self.retriever = retriever.bm25_index(tokens)
        n, df = len(tokens), Counter(w for t in tokens for w in set(t))
        self.idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}
        self.unseen_idf = math.log(1 + (n + 0.5) / 0.5)  # a word no training question has
        self.mean_words = float(np.mean([len(t) for t in tokens]))
        # Each question's nearest *other* question: the best of the top two that is not itself.
        found, scores = self.retriever.retrieve(tokens, k=2, show_progress=False, n_threads=1)
        nearest = np.where(found[:, 0] == np.arange(n), scores[:, 1], scores[:, 0])
        self.own = nearest / np.array([self.own_score(t) for t in tokens])

    def scores(self, texts: list[str]):
        import numpy as np

        tokens = retriever.tokens(texts)
        out = np.zeros(len(texts))
        asked = [i for i, t in enumerate(tokens) if t]
        if asked:
            _, scores = self.retriever.retrieve([tokens[i] for i in asked], k=1, show_progress=False,
                                                n_threads=1)
            out[asked] = scores[:, 0] / np.array([self.own_score(tokens[i]) for i in asked])
        return out

    def own_score(self, words: list[str]) -> float:
        """BM25 of `words` against themselves as a document (bm25s' Lucene formula and defaults)."""
        k1, b = 1.5, 0.75
        norm = k1 * (1 - b + b * len(words) / self.mean_words)
        return sum(self.idf.get(w, self.unseen_idf) * n * (k1 + 1) / (n + norm) for w,
                   n in Counter(words).items())


class Semantic:
    """Cosine similarity of sentence embeddings (sentence-transformers) to the nearest training question."""

    BATCH = 64

    def __init__(self, questions: list[str], model: str):
        import numpy as np

        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise FinetuneError(f"monitor.embedding {model}: install sentence-transformers (pip install "
                                "sentence-transformers), or leave monitor.embedding empty for BM25") from None
        try:
            self.model = SentenceTransformer(model, device="cpu")
        except (OSError, ValueError) as e:
            raise FinetuneError(
                f"monitor.embedding {model}: cannot load it ({str(e).splitlines()[0]}); give a "
                "sentence-transformers model folder or hub id") from None
        self.train = self._embed(questions)
        similar = self.train @ self.train.T
        np.fill_diagonal(similar, -np.inf)
        self.own = similar.max(axis=1)

    def _embed(self, texts: list[str]):
        return self.model.encode(texts, batch_size=self.BATCH, normalize_embeddings=True,
                                 show_progress_bar=False)

    def scores(self, texts: list[str]):
        return (self._embed(texts) @ self.train.T).max(axis=1)


@dataclass
class Novelty:
    """The training questions indexed, with the similarity under which a request counts as new."""

    questions: list[str]
    index: Lexical | Semantic
    threshold: float
    language: str | None                 # the training questions' main language
    mean_chars: float
    method: str = "bm25"

    def scores(self, texts: list[str]) -> list[float]:
        """Each text's similarity to its nearest training question."""
        return self.index.scores(texts).tolist() if texts else []

    def is_new(self, texts: list[str]) -> list[bool]:
        return [s < self.threshold for s in self.scores(texts)]


@dataclass
class Topic:
    """A group of new requests: its size, its top words, and the requests in it (their indices)."""

    size: int
    words: list[str]
    members: list[int] = field(default_factory=list)


def calibrate(questions: list[str], quantile: float, embedding: str | None = None) -> Novelty | None:
    """The index of `questions` (BM25, or the sentence-transformers model `embedding`) and its threshold; None
    for fewer than MIN_TRAIN questions with words."""
    import numpy as np

    questions = [q for q in questions if q.strip()]
    tokens = retriever.tokens(questions)
    kept = [q for q, t in zip(questions, tokens) if t]
    if len(kept) < MIN_TRAIN:
        return None
    index = Semantic(kept, embedding) if embedding else Lexical([t for t in tokens if t])
    # A floor above zero: a request sharing nothing with the training questions is new whatever the quantile
    # says.
    threshold = max(float(np.quantile(index.own, quantile)), 1e-9)
    return Novelty(kept, index, threshold, main_language(kept), float(np.mean([len(q) for q in kept])),
                   embedding or "bm25")


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
    """The largest groups of `texts` (the new requests' questions) by topic, largest first; the texts in none
    of them are the caller's "other". A text is the set of its words that at least one other text shares
    (TF-IDF, binary, stop words left out): a word only one request uses says nothing about what requests have
    in common, and kept, it drowns the word they share (a product's name) in each request's own words. Above
    CLUSTER_SAMPLE texts, a seeded sample is clustered and every other text joins the topic whose centre it is
    nearest to, when near enough."""
    import numpy as np
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.feature_extraction.text import TfidfVectorizer

    index = list(range(len(texts)))
    if len(index) > CLUSTER_SAMPLE:
        index = sorted(np.random.default_rng(seed).choice(len(texts), CLUSTER_SAMPLE, replace=False).tolist())
    try:
        vectorizer = TfidfVectorizer(stop_words=sorted(_stop_words()), min_df=2, binary=True)
        matrix = vectorizer.fit_transform([texts[i] for i in index])
    except ValueError:  # no word shared by two texts (or every text stop words only)
        return []
    rows = np.flatnonzero(matrix.getnnz(axis=1) > 0)
    if len(rows) < min_size:
        return []
    labels = AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average",
                                     distance_threshold=CLUSTER_DISTANCE).fit_predict(matrix[rows].toarray())
    vocabulary = vectorizer.get_feature_names_out()
    found, centres = [], []
    for label, size in Counter(labels.tolist()).most_common():
        if size < min_size or len(found) == most:
            break
        members = rows[labels == label]
        weights = np.asarray(matrix[members].mean(axis=0)).ravel()
        words = [str(vocabulary[i]) for i in np.argsort(-weights)[:4] if weights[i] > 0]
        found.append(Topic(int(size), words, [index[i] for i in members]))
        centres.append(weights / (np.linalg.norm(weights) or 1.0))
    sampled = set(index)
    rest = [i for i in range(len(texts)) if i not in sampled]
    if rest and found:
        near = vectorizer.transform([texts[i] for i in rest]) @ np.array(centres).T
        for i, similar in zip(rest, np.asarray(near)):
            if similar.max() >= 1 - CLUSTER_DISTANCE:
                topic = found[int(similar.argmax())]
                topic.members.append(i)
                topic.size += 1
    return sorted(found, key=lambda t: -t.size)
