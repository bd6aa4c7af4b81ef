"""DiffDis in the engine directory: one graph (the UNet layers up to the last block the text stream
reads, at its image step, on its prompt baked in, + the text stream), its weights and config beside it
(parity rebuilds the torch module from them), and a typed manifest record (`DiffDisSpec`).

Graph: sample (B, C, H, W) — the image noised at the image step with the fixed ε —, text (B, Q, D) raw
pooled text queries, noise (B, Q, D) and timestep (B, Q) per query -> error (B, Q) (mode "denoise"),
similarity (B, Q) (mode "generate": the DDIM generation is unrolled in the graph). One UNet pass per
image whatever Q, so every candidate and every (t, ε) of an image ride on one call."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from diffscore.engine.graph_contract import DIFFDIS, diffdis_graph_contract
from diffscore.engine.manifest import DiffDisSpec
from diffscore.export.graphs import model_dims, to_export
from diffscore.errors import EngineError
from diffscore.reference.diffdis import CONFIG, WEIGHTS, DiffDis, image_branch, load_diffdis
from diffscore.reference.loading import Components, encode_prompts
from diffscore.reference.scoring_unet import ScoringUNet

GRAPH = DIFFDIS


class DiffDisGraph(nn.Module):
    """x_t at the image step + text queries -> (error, similarity): the UNet's taps (the model's frozen UNet, or
    a unified run's trained one: reference.diffdis.image_branch) and DiffDis."""

    def __init__(self, unet: nn.Module, model: DiffDis, prompt_embedding: torch.Tensor):
        super().__init__()
        cfg = model.config
        self.unet = ScoringUNet(unet, attention_layers=[], feature_blocks=list(cfg.blocks))
        self.model = model
        self.register_buffer("t", torch.tensor([float(cfg.image_step)]))
        self.register_buffer("emb", prompt_embedding)  # (1, L, D)

    def forward(self, sample, text, noise, timestep):
        B = sample.shape[0]
        _, _, *feats = self.unet(sample, self.t.expand(B), self.emb.expand(B, -1, -1))
        return self.model(feats, text, noise, timestep)


def load_run(comp: Components, run_dir: str | Path, source_sha256: str) -> DiffDis:
    """A `diffscore train-diffdis` run that fits this model."""
    model = load_diffdis(run_dir)
    cfg = model.config
    if cfg.source_sha256 and cfg.source_sha256 != source_sha256:
        raise EngineError(f"DiffDis run {run_dir} was trained on another model (sha256 {cfg.source_sha256[:12]}, this "
                          f"one {source_sha256[:12]}); retrain it with `diffscore train-diffdis`")
    if cfg.text_dim != int(comp.text_encoder.config.hidden_size):
        raise EngineError(f"DiffDis run {run_dir} reads {cfg.text_dim}-wide text embeddings, this model's are "
                          f"{comp.text_encoder.config.hidden_size}; retrain it on this model")
    return model


def diffdis_contract(comp: Components, model: DiffDis) -> tuple:
    """(module, sample inputs, input specs, output specs) of the DiffDis graph."""
    cfg = model.config
    module = DiffDisGraph(image_branch(comp, model), model.eval(), encode_prompts(comp, [cfg.prompt])).eval()
    contract = diffdis_graph_contract(model_dims(comp, 0), cfg.text_dim)
    return to_export(module, contract)


def ship_run(run_dir: str | Path, out_dir: Path, model: DiffDis) -> DiffDisSpec:
    """Copy the run's weights and config into the engine directory; the manifest record."""
    run_dir, cfg = Path(run_dir), model.config
    shutil.copyfile(run_dir / WEIGHTS, out_dir / WEIGHTS)
    shutil.copyfile(run_dir / CONFIG, out_dir / CONFIG)
    return DiffDisSpec(graph=GRAPH, blocks=list(cfg.blocks), image_step=cfg.image_step, seed=cfg.seed,
                       eos_token_id=cfg.eos_token_id, text_dim=cfg.text_dim, timesteps=cfg.timesteps,
                       generate_steps=cfg.generate_steps, mode=cfg.mode, weights=WEIGHTS, config=CONFIG)
