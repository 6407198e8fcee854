"""Share of answers that parse as JSON (and conform to a JSON Schema), shipped with mlflow-finetune-plugin."""

import json
import re

import datasets
import evaluate

_DESCRIPTION = """
JSON validity: 1 for an answer that parses as JSON (a single ```json fenced block is unwrapped first) and, \
when
`schema` is given, conforms to it; else 0. The mean is the share of usable structured answers. Schemas are
checked with `jsonschema` when it is installed, else with a built-in subset (type, required, properties,
additionalProperties false, items, enum).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's answers.
    schema (dict): optional JSON Schema the parsed answer must conform to.
    per_example (bool): also return `json_valid_per_example`. Default False.
Returns:
    json_valid (float): share of valid answers, in [0, 1].
Examples:
    >>> m = evaluate.load("path/to/json_valid")
    >>> m.compute(predictions=['{"a": 1}', "a: 1"])
    {'json_valid': 0.5}
"""

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def _conforms(value, schema):
    """The subset of JSON Schema used when `jsonschema` is not installed."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        is_bool = isinstance(value, bool)
        if not any(isinstance(value, _TYPES[k]) and (k == "boolean" or not is_bool) for k in kinds):
            return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", [])):
            return False
        if schema.get("additionalProperties") is False and any(key not in props for key in value):
            return False
        return all(_conforms(value[k], s) for k, s in props.items() if k in value)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return all(_conforms(item, schema["items"]) for item in value)
    return True


def _valid(text, schema):
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return 0.0
    if not schema:
        return 1.0
    try:
        import jsonschema
    except ImportError:
        return float(_conforms(value, schema))
    return float(jsonschema.Draft202012Validator(schema).is_valid(value))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class JsonValid(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, schema=None, per_example=False):
        scores = [_valid(p, schema) for p in predictions]
        out = {"json_valid": sum(scores) / len(scores) if scores else 0.0}
        if per_example:
            out["json_valid_per_example"] = scores
        return out
