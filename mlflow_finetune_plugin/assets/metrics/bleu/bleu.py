"""BLEU computed by `sacrebleu`, shipped with mlflow-finetune-plugin so it loads offline."""

import datasets
import evaluate
from sacrebleu.metrics import BLEU

_DESCRIPTION = """
BLEU of the answers against the references, computed by sacrebleu (13a tokenizer, exponential smoothing) and
scaled to [0, 1] (sacrebleu reports 0-100). `bleu` is the corpus-level score; `bleu_per_example` holds
sentence-level scores with effective order, so short answers are not all zero.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's answers.
    references (list of str): the expected answers, one per prediction.
    lowercase (bool): default False. tokenize (str): sacrebleu tokenizer, default "13a".
    per_example (bool): also return `bleu_per_example`. Default False.
Returns:
    bleu (float): corpus BLEU in [0, 1].
Examples:
    >>> m = evaluate.load("path/to/bleu")
    >>> m.compute(predictions=["the cat sat on the mat"], references=["the cat sat on the mat"])
    {'bleu': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, lowercase=False, tokenize="13a", per_example=False):
        corpus = BLEU(lowercase=lowercase, tokenize=tokenize)
        out = {"bleu": corpus.corpus_score(list(predictions), [list(references)]).score / 100 if predictions
               else 0.0}
        if per_example:
            sentence = BLEU(lowercase=lowercase, tokenize=tokenize, effective_order=True)
            out["bleu_per_example"] = [sentence.sentence_score(p, [r]).score / 100
                                       for p, r in zip(predictions, references)]
        return out
