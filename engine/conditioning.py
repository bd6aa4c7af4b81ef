"""Text conditioning in the runtime: the text encoder graph's feed and the UNet graph's text inputs.

An SD engine (`manifest.conditioning == "sd"`) tokenizes once and feeds the UNet `encoder_hidden_states`.
An SDXL engine tokenizes with both of the model's tokenizers (each pads with its own token), and its UNet
also takes `text_embeds` (encoder 2's pooled projection, from the text encoder graph) and `time_ids` (the
manifest's: original size, crop top-left, target size of the scored square). A mixin of Engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


class TextConditioning:
    def token_feed(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The text encoder graph's feed: (P, L) int64 ids per tokenizer (input_ids; SDXL adds input_ids_2)."""
        feed = {"input_ids": np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)}
        if self.manifest.conditioning == "sdxl":
            feed["input_ids_2"] = np.array([e.ids for e in self.tokenizer_2.encode_batch(prompts)], dtype=np.int64)
        return feed

    def text_conditioning(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The UNet graph's text inputs, one row per prompt, named as its inputs: encoder_hidden_states (P, L, D);
        SDXL adds text_embeds (P, D2) and time_ids (P, 6). Rows of it (`conditioning_rows`) feed the UNet."""
        cond = {"encoder_hidden_states": self.encode_text(prompts)}
        if self.manifest.conditioning == "sdxl":
            cond["text_embeds"] = np.stack([self._pooled_cache[p] for p in prompts])
            cond["time_ids"] = np.tile(np.asarray(self.manifest.time_ids, dtype=np.float32), (len(prompts), 1))
        return cond

    def conditioning_rows(self, conditioning, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The UNet feed's text inputs for the given prompt rows. `conditioning`: text_conditioning's dict, or
        encode_text's array alone (enough for an SD engine, refused in one line by an SDXL one)."""
        if not isinstance(conditioning, dict):
            if self.manifest.conditioning != "sd":
                raise EngineError(f"{self.engine_dir} is an {self.manifest.conditioning} engine: its UNet also takes "
                                  "text_embeds and time_ids; this method builds SD conditioning only")
            conditioning = {"encoder_hidden_states": conditioning}
        return {name: value[rows] for name, value in conditioning.items()}
