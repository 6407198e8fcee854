"""chrF (character n-gram F-score) computed by `sacrebleu`, shipped with mlflow-finetune-plugin to load
offline."""

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = """
chrF: character n-gram F-score (beta 2) of the answers against the references, computed by sacrebleu and
scaled to [0, 1] (sacrebleu reports 0-100). `chrf` is the corpus-level score (statistics summed over all \
pairs,
as sacrebleu does); `chrf_per_example` holds sentence-level scores. word_order=2 gives chrF++.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's answers.
    references (list of str): the expected answers, one per prediction.
    char_order (int): default 6. word_order (int): default 0 (2 for chrF++). beta (int): default 2.
    lowercase (bool): default False.
    per_example (bool): also return `chrf_per_example`. Default False.
Returns:
    chrf (float): corpus chrF in [0, 1].
Examples:
    >>> m = evaluate.load("path/to/chrf")
    >>> m.compute(predictions=["hello world"], references=["hello world"])
    {'chrf': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2, lowercase=False,
                 per_example=False):
        chrf = CHRF(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)
        out = {"chrf": chrf.corpus_score(list(predictions), [list(references)]).score / 100 if predictions
               else 0.0}
        if per_example:
            out["chrf_per_example"] = [chrf.sentence_score(p, [r]).score / 100 for p,
                                       r in zip(predictions, references)]
        return out
