"""Exact match, shipped with mlflow-finetune-plugin so it loads offline: `evaluate.load(<path to this
folder>)`."""

import re
import string

import datasets
import evaluate

_DESCRIPTION = """
Exact match: 1 for an answer that equals its reference, else 0; the mean over all pairs.
Both strings are stripped and inner runs of whitespace collapsed to one space before comparing.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's answers.
    references (list of str): the expected answers, one per prediction.
    ignore_case (bool): compare lowercased strings. Default False.
    ignore_punctuation (bool): drop ASCII punctuation before comparing. Default False.
    per_example (bool): also return `exact_match_per_example`, one score per pair. Default False.
Returns:
    exact_match (float): share of exact matches, in [0, 1].
Examples:
    >>> m = evaluate.load("path/to/exact_match")
    >>> m.compute(predictions=["Paris ", "london"], references=["Paris", "London"])
    {'exact_match': 0.5}
"""


def _normalize(text, ignore_case, ignore_punctuation):
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\s+", " ", text).strip()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, ignore_case=False, ignore_punctuation=False,
                 per_example=False):
        scores = [float(_normalize(p, ignore_case, ignore_punctuation)
                        == _normalize(r, ignore_case, ignore_punctuation)) for p,
                  r in zip(predictions, references)]
        out = {"exact_match": sum(scores) / len(scores) if scores else 0.0}
        if per_example:
            out["exact_match_per_example"] = scores
        return out
