"""The ITC graphs of a `diffscore finetune --clip` run (reference/clip_finetune.py): its fine-tuned CLIP towers.

- ``itc_image``: pixel_values (B, C, S, S), CLIP-normalised -> ``embedding`` (L2-normalised) and ``features``
  (CLIPModel.get_image_features: the pooled, projected visual embedding).
- ``itc_text``: input_ids (B, L) from the run's CLIP tokenizer (shipped as ``clip_tokenizer.json``, padding and
  truncation to L baked in) -> ``embedding`` and ``features`` (get_text_features).

The manifest's ``itc`` record says kind "clip" and how to feed them (image size, channels, mean, std, L);
`Engine.match(method="itc")` is the cosine similarity of the two embeddings (engine/scorers/itc.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffscore.engine.graph_contract import ITC_IMAGE, ITC_TEXT, itc_graph_contracts
from diffscore.engine.manifest import BATCH, ItcSpec, TensorSpec
from diffscore.export.graphs import to_export
from diffscore.reference.clip_finetune import CLIP_SUBDIR, image_features, load_clip, text_features

TOKENIZER_FILE = "clip_tokenizer.json"


class ClipTowerGraph(nn.Module):
    """One CLIP tower: its input -> (the L2-normalised embedding, CLIPModel.get_*_features)."""

    def __init__(self, clip, features):
        super().__init__()
        self.clip, self.features = clip, features  # features: image_features or text_features

    def forward(self, x):
        f = self.features(self.clip, x)
        return F.normalize(f, dim=-1), f


def clip_itc_contracts(run: dict, run_dir: Path) -> tuple[dict, ItcSpec]:
    """{graph name: (module, sample, inputs, outputs)} for the CLIP towers, and the manifest record."""
    clip, _, spec = load_clip(Path(run_dir) / CLIP_SUBDIR)
    cfg = run["config"]
    C, S, L, dim = spec.image_channels, spec.image_size, spec.max_length, int(clip.config.projection_dim)
    roles = itc_graph_contracts(None, dim, clip=(C, S, L))
    out = [*roles[ITC_IMAGE].outputs, TensorSpec("features", "float32", [BATCH, dim])]  # + the raw features
    ids = torch.full((2, L), int(clip.config.text_config.eos_token_id or 0), dtype=torch.long)  # BOS, then EOS
    ids[:, 0] = int(clip.config.text_config.bos_token_id or 0)
    contracts = {ITC_IMAGE: to_export(ClipTowerGraph(clip, image_features).eval(), roles[ITC_IMAGE], out),
                 ITC_TEXT: (ClipTowerGraph(clip, text_features).eval(), (ids,), list(roles[ITC_TEXT].inputs), out)}
    record = ItcSpec(image_graph=ITC_IMAGE, text_graph=ITC_TEXT, noise_step=int(cfg["noise_step"]),
                     seed=int(cfg["seed"]), blocks=list(cfg["blocks"]), dim=dim, objectives=list(cfg["objectives"]),
                     run=str(Path(run_dir).resolve()), kind="clip", tokenizer=TOKENIZER_FILE, max_length=L,
                     image_size=S, image_channels=C, image_mean=list(spec.image_mean), image_std=list(spec.image_std))
    return contracts, record


def write_clip_tokenizer(run_dir: Path, path: Path, max_length: int) -> None:
    """The run's CLIP tokenizer as tokenizer.json for the `tokenizers` library, padding/truncation to L baked in."""
    _, tokenizer, _ = load_clip(Path(run_dir) / CLIP_SUBDIR)
    backend = tokenizer.backend_tokenizer
    backend = backend.__class__.from_str(backend.to_str())  # a copy
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(length=max_length, pad_id=int(tokenizer.pad_token_id), pad_token=str(tokenizer.pad_token))
    backend.save(str(path))


def clip_itc_parity(engine_dir: Path, manifest, images=None, seed: int = 0) -> list:
    """`match(method="itc")` of a CLIP run per backend against transformers' CLIP (fp32 scores and top-1 decisions)."""
    import numpy as np

    from diffscore.engine.engine import load
    from diffscore.export.parity import available_backends, real_images
    from diffscore.export.verdicts import RTOL, agreement, compare
    from diffscore.reference.clip_finetune import clip_similarity
    from diffscore.reference.finetune import read_run_log

    run = read_run_log(manifest.itc.run)
    images = list(images) if images else real_images(manifest, 3, np.random.default_rng(seed))  # all given: decisions
    texts = run["captions"][:10]
    want = clip_similarity(Path(manifest.itc.run) / CLIP_SUBDIR, images, texts)
    verdicts = []
    for backend in available_backends(manifest):
        with load(engine_dir, backend=backend) as engine:
            got = engine.match(images, texts, method="itc").scores
        verdicts.append(compare(f"{backend} fp32 match (itc, clip)", got, want, RTOL["fp32"]))
        verdicts.append(agreement(f"{backend} fp32 match (itc, clip)", list(got.argmax(1)), list(want.argmax(1)),
                                  "torch fp32", "images"))
    return verdicts
