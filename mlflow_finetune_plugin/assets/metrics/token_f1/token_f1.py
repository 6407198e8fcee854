"""Token F1 (SQuAD style), shipped with mlflow-finetune-plugin so it loads offline."""

import re
import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = """
Token F1: the harmonic mean of precision and recall of the answer's tokens against the reference's tokens
(bags of tokens, so order does not matter), averaged over all pairs. Tokens come from SQuAD's normalization:
lowercase, ASCII punctuation and the articles a/an/the removed, split on whitespace. Two empty answers score \
1,
one empty answer scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's answers.
    references (list of str): the expected answers, one per prediction.
    per_example (bool): also return `token_f1_per_example`. Default False.
Returns:
    token_f1 (float): mean token F1, in [0, 1].
Examples:
    >>> m = evaluate.load("path/to/token_f1")
    >>> m.compute(predictions=["the cat sat"], references=["a cat sat down"])
    {'token_f1': 0.8}
"""


def _tokens(text):
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _f1(prediction, reference):
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of Text, EMNLP "
                     "2016.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, per_example=False):
        scores = [_f1(p, r) for p, r in zip(predictions, references)]
        out = {"token_f1": sum(scores) / len(scores) if scores else 0.0}
        if per_example:
            out["token_f1_per_example"] = scores
        return out
