"""Text conditioning in the runtime: the text encoder graph's feed and the UNet graph's text inputs.

An SD engine (`manifest.conditioning == "sd"`) tokenizes once and feeds the UNet `encoder_hidden_states`.
An SDXL engine tokenizes with both of the model's tokenizers (each pads with its own token), and its UNet
also takes `text_embeds` (encoder 2's pooled projection, from the text encoder graph) and `time_ids` (the
manifest's: original size, crop top-left, target size of the scored square). A mixin of Engine.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from diffscore.engine.graph_contract import CONTEXT, INPUT_IDS, INPUT_IDS_2, POOLED, TIME_IDS
from diffscore.engine.manifest import resolve_inside
from diffscore.errors import EngineError, first_line


def read_tokenizer(engine_dir: Path, name: str, what: str = "tokenizer"):
    """A `tokenizers` Tokenizer from the engine directory; one line when it cannot be parsed."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(resolve_inside(engine_dir, name, what)))
    except EngineError:
        raise
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise EngineError(f"{name} in {engine_dir} is not a tokenizer the `tokenizers` library can read "
                          f"({first_line(e)[:120]}); re-export the engine") from None


PROMPT_CACHE_ENV = "DIFFSCORE_PROMPT_CACHE_MB"
DEFAULT_PROMPT_CACHE_MB = 256  # ~1,100 prompts at SD-1.5 size (77 x 768 float32 = 236 KB each); the demo's are tiny


def prompt_cache_bytes() -> int:
    """The prompt cache's bound: DIFFSCORE_PROMPT_CACHE_MB (0 turns the cache off), else the default."""
    raw = os.environ.get(PROMPT_CACHE_ENV)
    if raw is None:
        return DEFAULT_PROMPT_CACHE_MB * 2**20
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not 0 <= mb < float("inf"):
        raise EngineError(f"{PROMPT_CACHE_ENV}={raw!r} is not a size in MB ≥ 0 (0 turns the prompt cache off)")
    return int(mb * 2**20)


class PromptCache:
    """Text embeddings of recent prompts, least recently used dropped first beyond `max_bytes`: a served
    engine sees endless new prompts, and each one costs the text encoder's output (~236 KB at SD-1.5 size)."""

    def __init__(self, max_bytes: int | None = None):
        self.max_bytes = prompt_cache_bytes() if max_bytes is None else max_bytes
        self.nbytes = 0
        self._items: OrderedDict[str, tuple] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, prompt: str):
        item = self._items.get(prompt)
        if item is not None:
            self._items.move_to_end(prompt)
        return item

    def put(self, prompt: str, item: tuple) -> None:
        """Keep `item` (arrays, copied by the caller); drop the oldest until the total fits again."""
        size = sum(a.nbytes for a in item if a is not None)
        if prompt in self._items or size > self.max_bytes:
            return
        self._items[prompt] = item
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= sum(a.nbytes for a in old if a is not None)


class TextConditioning:
    def token_feed(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The text encoder graph's feed: (P, L) int64 ids per tokenizer (input_ids; SDXL adds input_ids_2)."""
        feed = {INPUT_IDS: np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)}
        if self.manifest.conditioning == "sdxl":
            feed[INPUT_IDS_2] = np.array([e.ids for e in self.tokenizer_2.encode_batch(prompts)], dtype=np.int64)
        return feed

    def text_conditioning(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The UNet graph's text inputs, one row per prompt, named as its inputs: encoder_hidden_states (P, L, D);
        SDXL adds text_embeds (P, D2) and time_ids (P, 6). Rows of it (`conditioning_rows`) feed the UNet."""
        embeddings = self.prompt_embeddings(prompts)
        cond = {CONTEXT: np.stack([hidden for hidden, _ in embeddings])}
        if self.manifest.conditioning == "sdxl":
            cond[POOLED] = np.stack([pooled for _, pooled in embeddings])
            cond[TIME_IDS] = np.tile(np.asarray(self.manifest.time_ids, dtype=np.float32), (len(prompts), 1))
        return cond

    def conditioning_rows(self, conditioning, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The UNet feed's text inputs for the given prompt rows. `conditioning`: text_conditioning's dict, or
        encode_text's array alone (enough for an SD engine, refused in one line by an SDXL one)."""
        if not isinstance(conditioning, dict):
            if self.manifest.conditioning != "sd":
                raise EngineError(f"{self.engine_dir} is an {self.manifest.conditioning} engine: its UNet also takes "
                                  "text_embeds and time_ids; this method builds SD conditioning only")
            conditioning = {CONTEXT: conditioning}
        return {name: take_rows(value, rows) for name, value in conditioning.items()}


class Rows(np.ndarray):
    """table[rows] that remembers `table` and `rows`: a plain array to every backend; the TensorRT runner
    uploads the table (the prompt set's embeddings, the same object for a whole call) once and gathers the
    rows on the GPU instead of copying (n, L, D) per call."""

    table = rows = None


def take_rows(table: np.ndarray, rows: np.ndarray) -> Rows:
    out = np.asarray(table)[rows].view(Rows)
    out.table, out.rows = table, rows
    return out
