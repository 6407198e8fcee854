"""ROUGE-1/2/L F-measures computed by `rouge_score`, shipped with mlflow-finetune-plugin so it loads
offline."""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """
ROUGE F-measures (rouge1, rouge2, rougeL) of each answer against its reference, computed by Google's
`rouge_score` package, averaged over all pairs (a plain mean, not the bootstrap of the hub's `rouge`).
rouge_score's default tokenizer lowercases and keeps only [a-z0-9] runs; pass `tokenizer` (an object with a
`tokenize(text) -> list[str]` method) for other languages.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's answers.
    references (list of str): the expected answers, one per prediction.
    rouge_types (list of str): default ["rouge1", "rouge2", "rougeL"].
    use_stemmer (bool): Porter-stem tokens first. Default False.
    tokenizer: optional rouge_score tokenizer.
    per_example (bool): also return `<type>_per_example` lists. Default False.
Returns:
    one float in [0, 1] per rouge type.
Examples:
    >>> m = evaluate.load("path/to/rouge")
    >>> m.compute(predictions=["the cat sat"], references=["the cat sat down"], rouge_types=["rougeL"])
    {'rougeL': 0.857...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, ACL 2004.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, tokenizer=None,
                 per_example=False):
        rouge_types = list(rouge_types or ["rouge1", "rouge2", "rougeL"])
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)
        per = {t: [] for t in rouge_types}
        for prediction, reference in zip(predictions, references):
            scores = scorer.score(reference, prediction)  # rouge_score takes (target, prediction)
            for t in rouge_types:
                per[t].append(scores[t].fmeasure)
        out = {t: sum(v) / len(v) if v else 0.0 for t, v in per.items()}
        if per_example:
            out.update({f"{t}_per_example": v for t, v in per.items()})
        return out
