"""Checks at the API boundary: every option a caller (the CLI or Python) passes is validated here,
before any work, with one line that says what was expected and what came in."""

from __future__ import annotations

import math
import numbers
import string

from diffscore.errors import EngineError

MAX_SEED = 2**32 - 1


def check_labels(labels, what: str = "labels") -> list[str]:
    """A non-empty list of distinct, non-empty strings (a single string is one label). Anything else in the
    list (None, a number) is refused: str() would quietly make a class named "None"."""
    if isinstance(labels, str):
        labels = [labels]
    try:
        labels = list(labels)
    except TypeError:
        raise EngineError(f"{what} must be a list of strings, got {type(labels).__name__}") from None
    if odd := [x for x in labels if not isinstance(x, str)]:
        raise EngineError(f"{what} must be strings, got {odd[0]!r} ({type(odd[0]).__name__}); pass the class names as "
                          "text, e.g. ['cat', 'dog']")
    labels = [x.strip() for x in labels]
    if not labels or any(not x for x in labels):
        raise EngineError(f"{what} must be a non-empty list of non-empty strings, got {labels!r}")
    if len(set(labels)) != len(labels):
        raise EngineError(f"{what} contain duplicates: {sorted({x for x in labels if labels.count(x) > 1})}")
    return labels


def check_template(template: str) -> str:
    """A prompt template with exactly one `{}` for the label (write `{{` / `}}` for literal braces)."""
    if not isinstance(template, str):
        raise EngineError(f"a template must be a string with one {{}}, got {type(template).__name__}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise EngineError(f"template {template!r} has a stray brace ({e}); "
                          f"write {{{{ or }}}} for a literal brace") from None
    if fields != [("", "", None)]:
        raise EngineError(f"template {template!r} must hold exactly one {{}} for the label (found {len(fields)} "
                          "field(s)); e.g. 'a photo of a {}'")
    return template


def integer(value):
    """`value` as a Python int when it is an integer of any kind (int, numpy.int64, ...), else None; bools are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def check_seed(seed) -> int:
    value = integer(seed)
    if value is None or not 0 <= value <= MAX_SEED:
        raise EngineError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}")
    return value


def check_templates(template: str | None, templates, default: str) -> list[str]:
    """The prompt templates of a call: `templates`, else [`template`], else [the engine's default]. An empty
    string or an empty list is refused, not quietly replaced by the default."""
    if templates is not None:
        try:
            items = [] if isinstance(templates, str) else list(templates)
        except TypeError:
            items = []
        if not items:
            raise EngineError(f"templates must be a non-empty list of templates with one {{}}, got {templates!r}")
        return [check_template(t) for t in items]
    return [check_template(default if template is None else template)]


def check_count(name: str, value, minimum: int = 1, optional: bool = False):
    """An integer ≥ minimum (None allowed when optional: the default applies)."""
    if value is None and optional:
        return None
    number = integer(value)
    if number is None or number < minimum:
        raise EngineError(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return number


def check_finite(name: str, value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise EngineError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise EngineError(f"{name} must be a finite number, got {value!r}")
    return value


def check_distinct_tokens(texts: list[str], token_ids: list[list[int]], what: str = "labels") -> None:
    """Two texts that tokenize to the same ids (e.g. identical up to the tokenizer's truncation) score
    identically: refuse them instead of tying silently."""
    seen: dict[tuple, str] = {}
    for text, ids in zip(texts, token_ids):
        other = seen.setdefault(tuple(ids), text)
        if other != text:
            raise EngineError(f"{what} {other!r} and {text!r} give the same tokens (the text encoder truncates at "
                              f"{len(ids)} tokens, or they differ only in case/spacing): they cannot be told apart; "
                              "shorten or reword them")
