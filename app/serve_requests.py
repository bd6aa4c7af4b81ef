"""What a Serve request may hold and how it is read: the size limits, the fields of each endpoint, the JSON types
of their values, the images (base64, decoded with the CLI's checks), the classify options record and the JSON of a
result. Every mistake is a BadRequest: one line and its HTTP status. No Ray here (app/serve.py serves these)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from diffscore.engine.classify_options import DcOptions
from diffscore.engine.options import check_template
from diffscore.errors import EngineError, first_line

if TYPE_CHECKING:
    from starlette.requests import Request


@dataclass(frozen=True)
class Limits:
    """What one request may carry; beyond it the answer is a 413 or 400, never a 500."""

    max_bytes: int = 16 * 2**20  # request body
    max_images: int = 64  # images per request
    max_labels: int = 256  # labels (classify) or texts (match) per request
    max_pixels: int = 2**26  # decoded pixels of all images of a request (each also under the bomb limit)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


def token_digest(token: str) -> str:
    """What a replica keeps of the bearer token: its sha256 (the token itself stays in the starting process)."""
    return hashlib.sha256(token.encode()).hexdigest()


FIELDS = {
    "classify": {"images", "labels", "template", "stages", "loss", "seed"},
    "head": {"images", "head"},
    "match": {"images", "texts", "steps", "bias_weight", "seed"},
}


async def read_body(request: Request, task: str, limits: Limits) -> dict:
    """The request's JSON object, checked against the task's fields and the size limit (read in chunks:
    a body that claims no length stops at the limit too)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limits.max_bytes:
        raise BadRequest(f"request body of {int(length)} bytes is over the limit of {limits.max_bytes}", 413)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limits.max_bytes:
            raise BadRequest(f"request body of more than {limits.max_bytes} bytes is over the limit", 413)
    try:
        body = json.loads(raw)
    except ValueError as e:  # bad JSON, bad UTF-8, an integer of more digits than Python converts
        raise BadRequest(f"the body is not JSON: {first_line(e)}") from None
    except RecursionError:
        raise BadRequest("the body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object with the fields {', '.join(sorted(FIELDS[task]))}")
    unknown = sorted(set(body) - FIELDS[task])
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; /{task} takes {', '.join(sorted(FIELDS[task]))}")
    return body


def decode_images(value, limits: Limits, size: int) -> list:
    """PIL images at the engine's `size` (canonical mode, resized and cropped as the engine would) from a list of
    base64 strings; one line naming the first bad one. Done per request, so a bad image fails only its request."""
    from diffscore.engine.images import canonical, decode_image, resize_center_crop

    if not isinstance(value, list) or not value:
        raise BadRequest('"images" must be a non-empty list of base64-encoded image files')
    if len(value) > limits.max_images:
        raise BadRequest(f"{len(value)} images in one request; the limit is {limits.max_images}", 413)
    images, pixels = [], 0
    for i, item in enumerate(value):
        try:  # whitespace is allowed: `base64 FILE` wraps its output
            data = base64.b64decode("".join(item.split()), validate=True) if isinstance(item, str) else None
        except (binascii.Error, ValueError):
            data = None
        if not data:
            raise BadRequest(f"images[{i}] is not base64-encoded image bytes (send the file's bytes; "
                             "server paths and URLs are refused)")
        try:
            im = decode_image(data, f"images[{i}]")
            pixels += im.width * im.height
            if pixels > limits.max_pixels:
                raise BadRequest(f"the images of this request have more than {limits.max_pixels:,} pixels in all; "
                                 "send smaller images or fewer per request", 413)
            images.append(resize_center_crop(canonical(im), size))
        except EngineError as e:
            raise BadRequest(str(e)) from None
    return images


def text_list(body: dict, key: str, limits: Limits, required: bool = True) -> list[str] | None:
    from diffscore.engine.options import check_labels

    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise BadRequest(f'"{key}" must be a list of strings')
    if len(value) > limits.max_labels:
        raise BadRequest(f"{len(value)} {key} in one request; the limit is {limits.max_labels}")
    try:
        return check_labels(value, what=key)
    except EngineError as e:
        raise BadRequest(str(e)) from None


def typed(body: dict, key: str, kind, default=None, minimum=None):
    """body[key] if it has the JSON type `kind` (finite, and ≥ minimum), else one line saying what it should be."""
    value = body.get(key, default)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadRequest(f'"{key}" must be {names}, got {shorten(value)}')
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f'"{key}" must be a finite number, got {value}')
    if value is not None and minimum is not None and value < minimum:
        raise BadRequest(f'"{key}" must be ≥ {minimum}, got {shorten(value)}')
    return value


def shorten(value, limit: int = 60) -> str:
    """A request value as JSON for an error line, cut to `limit` characters (a caller may send megabytes)."""
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError, RecursionError):  # ints too long for str(), deep nesting
        text = type(value).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def finite(x) -> float | None:
    """A score as JSON allows it: a non-finite one (λ large enough to overflow) becomes null."""
    x = float(x)
    return x if math.isfinite(x) else None


def classify_options(body: dict, limits: Limits):
    """The request's DcOptions (the engine resolves and checks the values; here only their JSON types)."""
    stages = body.get("stages")
    if stages is not None:
        if not (isinstance(stages, list) and stages and all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in s)
                for s in stages)):
            raise BadRequest('"stages" must be a list of [n_samples, keep] integer pairs, e.g. [[50, 5], [500, 1]]')
        stages = tuple(tuple(s) for s in stages)
    template = typed(body, "template", str)
    if template is not None:  # checked here too, so the answer names the field
        try:
            check_template(template)
        except EngineError as e:
            raise BadRequest(f'"template": {e}') from None
    return DcOptions(labels=tuple(text_list(body, "labels", limits)),
                     templates=None if template is None else (template,),
                     stages=stages, loss=typed(body, "loss", str), seed=typed(body, "seed", int, 0, minimum=0))


def result_json(r) -> dict:
    return {"label": r.label, "ranking": [[c, finite(s)] for c, s in r.ranking], "passes": int(r.passes)}
