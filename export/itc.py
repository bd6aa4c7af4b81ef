"""The ITC graphs of a `diffscore finetune` run (reference/finetune.py), exported beside the merged UNet:

- ``itc_image``: x_t (B, C, H, W), the image noised at the run's fixed step with its fixed ε -> the
  L2-normalised image embedding (B, dim): the (merged) UNet on the empty prompt up to the blocks it
  pools (the exporter drops the later layers), spatial means, the projection. One UNet pass per image.
- ``itc_text``: the text encoder graph's last_hidden_state (B, L, D) -> the text embedding (B, dim).

`Engine.match(method="itc")` is then the cosine similarity of the two (engine/scorers/itc.py)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from diffscore.engine.graph_contract import ITC_IMAGE, ITC_TEXT, itc_graph_contracts
from diffscore.engine.manifest import ItcSpec
from diffscore.export.graphs import model_dims, to_export
from diffscore.reference.finetune import ItcHeads
from diffscore.reference.loading import Components, encode_prompts
from diffscore.reference.scoring_unet import ScoringUNet


class ItcImageGraph(nn.Module):
    def __init__(self, unet: nn.Module, heads: ItcHeads, blocks: list[str], noise_step: int,
                 null_embedding: torch.Tensor):
        super().__init__()
        self.tap = ScoringUNet(unet, attention_layers=[], feature_blocks=blocks)
        self.heads = heads
        self.register_buffer("t", torch.tensor([float(noise_step)]))
        self.register_buffer("emb", null_embedding)  # (1, L, D)

    def forward(self, sample):
        _, _, *feats = self.tap(sample, self.t.expand(sample.shape[0]), self.emb.expand(sample.shape[0], -1, -1))
        return self.heads.embed_image(feats)


class ItcTextGraph(nn.Module):
    def __init__(self, heads: ItcHeads):
        super().__init__()
        self.heads = heads

    def forward(self, last_hidden_state):
        return self.heads.embed_text(last_hidden_state)


def itc_contracts(comp: Components, heads: ItcHeads, run: dict, run_dir: Path) -> tuple[dict, ItcSpec]:
    """{graph name: (module, sample, inputs, outputs)} for the two graphs, and the manifest record.
    `comp`'s UNet already holds the merged LoRA."""
    cfg = run["config"]
    image = ItcImageGraph(comp.unet, heads, cfg["blocks"], cfg["noise_step"], encode_prompts(comp, [""])).eval()
    roles = itc_graph_contracts(model_dims(comp, 0), int(cfg["dim"]))
    contracts = {ITC_IMAGE: to_export(image, roles[ITC_IMAGE]), ITC_TEXT: to_export(ItcTextGraph(heads).eval(),
                                                                                      roles[ITC_TEXT])}
    spec = ItcSpec(image_graph=ITC_IMAGE, text_graph=ITC_TEXT, noise_step=int(cfg["noise_step"]),
                   seed=int(cfg["seed"]), blocks=list(cfg["blocks"]), dim=int(cfg["dim"]),
                   objectives=list(cfg["objectives"]), run=str(Path(run_dir).resolve()))
    return contracts, spec


def itc_parity(engine_dir: Path, manifest, comp, images=None, seed: int = 0) -> list:
    """`match(method="itc")` end to end (images x texts) per backend against the torch embeddings of the run
    (`comp` holds the merged LoRA, as parity's reference_components makes it)."""
    import numpy as np

    from diffscore.engine.engine import load
    from diffscore.export.parity import available_backends, real_images
    from diffscore.export.verdicts import RTOL, compare
    from diffscore.reference.finetune import itc_similarity, load_run_heads, read_run_log

    if manifest.itc is None:
        return []
    if manifest.itc.kind == "clip":  # a `finetune --clip` run: its CLIP towers against transformers'
        from diffscore.export.clip_itc import clip_itc_parity

        return clip_itc_parity(engine_dir, manifest, images, seed)
    run = read_run_log(manifest.itc.run)
    images = real_images(manifest, 3, np.random.default_rng(seed), images)
    texts = run["captions"][:5]
    want = itc_similarity(comp, load_run_heads(manifest.itc.run), run["config"], images, texts)
    verdicts = []
    for backend in available_backends(manifest):
        with load(engine_dir, backend=backend) as engine:
            got = engine.match(images, texts, method="itc").scores
        verdicts.append(compare(f"{backend} fp32 match (itc)", got, want, RTOL["fp32"]))
    return verdicts
