"""UniDiff-style fine-tuning (reference/finetune.py): each objective on a constructed batch against a hand
computation or diffusers' own noising, determinism, the merged export against the unmerged LoRA in torch,
and one-line errors. Tiny pixel model, a handful of steps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffscore.errors import EngineError
from diffscore.reference.finetune import (FinetuneConfig, check_config, denoising_loss, finetune, info_nce, is_loss,
                                          itc_loss, itc_similarity, load_run, rsc_loss)
from diffscore.reference.loading import load_components
from diffscore.reference.prompt_learning import Pairs

CAPTIONS = ["zero", "one", "two"]


def _ce_rows(logits: np.ndarray, target: np.ndarray) -> float:
    """Cross-entropy by hand: -Σ_j target_ij log softmax_ij, averaged over rows."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-(target * logp).sum(axis=1).mean())


def _unit(rng, n, d):
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_info_nce_is_clip_loss_by_hand():
    rng = np.random.default_rng(0)
    a, b, s = _unit(rng, 4, 3), _unit(rng, 4, 3), 7.5
    logits = s * a @ b.T
    expected = (_ce_rows(logits, np.eye(4)) + _ce_rows(logits.T, np.eye(4))) / 2
    got = info_nce(torch.tensor(a), torch.tensor(b), torch.eye(4, dtype=torch.bool), s)
    assert float(got) == pytest.approx(expected, rel=1e-9)
    assert float(rsc_loss(torch.tensor(a), torch.tensor(b), s)) == pytest.approx(expected, rel=1e-9)


def test_itc_counts_every_same_caption_pair_as_positive():
    rng = np.random.default_rng(1)
    a, b, s = _unit(rng, 3, 4), _unit(rng, 3, 4), 3.0
    ids = np.array([0, 0, 1])  # images 0 and 1 share a caption
    pos = (ids[:, None] == ids[None, :]).astype(float)
    target = pos / pos.sum(axis=1, keepdims=True)  # rows and columns alike (pos is symmetric)
    logits = s * a @ b.T
    expected = (_ce_rows(logits, target) + _ce_rows(logits.T, target)) / 2
    assert float(itc_loss(torch.tensor(a), torch.tensor(b), torch.tensor(ids), s)) == pytest.approx(expected, rel=1e-9)
    # aligned embeddings at a large scale: ITC near its floor (log 2 for a row with two positives, else 0)
    same = torch.tensor(_unit(rng, 3, 4))
    floor = (2 * np.log(2) / 3 + 2 * np.log(2) / 3) / 2  # rows 0,1 (and columns 0,1) split over 2 positives
    assert float(itc_loss(same[[0, 0, 2]], same[[0, 0, 2]], torch.tensor(ids), 100.0)) == pytest.approx(floor, abs=1e-3)


def test_is_loss_is_the_diffusers_training_loss(tiny_models, images_for):
    """The IS pass's ε̂ and loss against diffusers' own DDPMScheduler.add_noise and a plain UNet call."""
    from diffusers import DDPMScheduler

    from diffscore.engine.images import preprocess_batch
    from diffscore.reference.finetune import Branches

    comp = load_components(tiny_models["pixel"])
    x0 = torch.from_numpy(preprocess_batch(images_for(comp, 3), comp.image_size, comp.image_channels))
    t, eps = torch.tensor([5, 400, 990]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    branches = Branches(comp, FinetuneConfig(blocks=["mid_block"]), CAPTIONS)
    with torch.no_grad():
        eps_hat, feats = branches.diffusion(x0, torch.tensor([0, 1, 2]), t, eps)
        sched = DDPMScheduler.from_pretrained(tiny_models["pixel"], subfolder="scheduler")
        x_t = sched.add_noise(x0, eps, t)
        ref = comp.unet(x_t, t, encoder_hidden_states=branches.hidden, return_dict=False)[0]
    torch.testing.assert_close(eps_hat, ref, rtol=1e-5, atol=1e-5)
    assert float(is_loss(eps, eps_hat)) == pytest.approx(float(((ref - eps) ** 2).mean()), rel=1e-5)
    assert feats[0].shape[0] == 3


@pytest.fixture(scope="module")
def pairs(images_for, tiny_models):
    comp = load_components(tiny_models["pixel"])
    images = images_for(comp, 12, seed=3)
    return Pairs(images, [CAPTIONS[i % 3] for i in range(12)])


CFG = dict(shots=2, steps=3, batch_size=6, val_shots=1, eval_every=2, patience=1, dim=8, lr=1e-2)


@pytest.fixture(scope="module")
def run_dir(tiny_models, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    finetune(tiny_models["pixel"], pairs, out, FinetuneConfig(**CFG), progress=False)
    return out


def test_finetune_is_deterministic(tiny_models, pairs, run_dir, tmp_path):
    finetune(tiny_models["pixel"], pairs, tmp_path / "again", FinetuneConfig(**CFG), progress=False)
    for f in ("adapter.safetensors", "itc_heads.safetensors"):
        assert (tmp_path / "again" / f).read_bytes() == (run_dir / f).read_bytes(), f
    first, again = (json.loads((d / "training_log.json").read_text()) for d in (run_dir, tmp_path / "again"))
    assert first["loss"] == again["loss"] and first["validation"] == again["validation"]
    assert set(first["loss"]) == {"itc", "is", "rsc"} and first["validation"]  # every objective, a validation curve


def test_ablation_trains_only_its_objectives(tiny_models, pairs, tmp_path):
    run = finetune(tiny_models["pixel"], pairs, tmp_path / "itc", FinetuneConfig(**{**CFG, "steps": 2, "val_shots": 0},
                                                                                objectives=("itc",)), progress=False)
    assert set(run["loss"]) == {"itc"} and run["validation"] == []


def test_merged_export_serves_what_the_unmerged_lora_computes(tiny_models, pairs, run_dir, tmp_path):
    import diffscore
    from diffscore.export.onnx_export import export_engine

    engine_dir = export_engine(tiny_models["pixel"], tmp_path / "engine", adapters=run_dir, show_progress=False)
    comp = load_components(tiny_models["pixel"])
    heads, run = load_run(comp, run_dir)  # LoRA as an adapter, not folded in
    images, texts = pairs.images[:5], CAPTIONS
    ref = itc_similarity(comp, heads, run["config"], images, texts)
    with diffscore.load(engine_dir, backend="ort-cpu") as engine:
        got = engine.match(images, texts, method="itc")
        assert got.options.method == "itc"
        np.testing.assert_allclose(got.scores, ref, atol=1e-5)
        # the DSD and Diffusion Classifier paths run on the fine-tuned UNet unchanged
        assert engine.match(images[:1], texts, steps=2).scores.shape == (1, 3)
        assert engine.classify(images[:1], texts, stages=[(2, 1)])[0].label in texts
        assert engine.manifest.itc.objectives == ["itc", "is", "rsc"]
    from diffscore.engine.manifest import Manifest
    from diffscore.export.itc import itc_parity
    from diffscore.export.parity import reference_components

    manifest = Manifest.load(engine_dir)
    verdicts = itc_parity(engine_dir, manifest, reference_components(manifest))  # what `diffscore parity` adds
    assert verdicts and all(v.passed for v in verdicts), [str(v) for v in verdicts]
    with pytest.raises(EngineError, match="unknown match method 'clip'; choose from dsd, diffdis, itc"):
        diffscore.load(engine_dir, backend="ort-cpu").match(images, texts, method="clip")


def test_denoising_loss_matches_a_plain_loop(tiny_models, pairs):
    comp = load_components(tiny_models["pixel"])
    got = denoising_loss(comp, pairs.images[:3], pairs.captions[:3], timesteps=2, seed=0, batch_size=4)
    assert np.isfinite(got) and 0.5 < got < 5  # an untrained UNet: about the noise's variance


def test_errors_are_one_line(tiny_models, engines, pairs, tmp_path, run_cli):
    with pytest.raises(EngineError, match="unknown objective"):
        check_config(FinetuneConfig(objectives=("itc", "clip")))
    comp = load_components(tiny_models["pixel"])
    with pytest.raises(EngineError, match="unknown block"):
        check_config(FinetuneConfig(blocks=["nope"]), comp)
    import diffscore

    with (diffscore.load(engines["pixel"], backend="ort-cpu") as engine,
          pytest.raises(EngineError, match="no ITC embeddings")):
        engine.match(pairs.images[:1], CAPTIONS, method="itc")
    code, err = run_cli("finetune", str(tiny_models["pixel"]), "--demo", "--shots", "1", "--out", str(tmp_path / "r"),
                        "--objectives", "itc,foo")
    assert code == 1 and "unknown objective(s) foo" in err and "Traceback" not in err


def test_cli_finetune_export_match(tiny_models, pairs, tmp_path, run_cli_out):
    """The user's path: pairs.jsonl -> finetune -> export --adapters -> match --method itc."""
    from PIL import Image

    lines = []
    for i, (image, text) in enumerate(zip(pairs.images, pairs.captions)):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": text}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    model, run, engine = tiny_models["pixel"], tmp_path / "run", tmp_path / "engine"
    code, out, err = run_cli_out("finetune", model, "--data", tmp_path / "pairs.jsonl", "--shots", "2", "--out", run,
                                 "--train-steps", "2", "--objectives", "itc,rsc", "--batch-size", "4", "--val-shots",
                                 "0")
    assert code == 0, err
    assert "itc " in out and "rsc " in out and "is " not in out.split(";")[1]
    assert run_cli_out("export", model, engine, "--adapters", run)[0] == 0
    code, out, err = run_cli_out("info", engine)
    assert code == 0 and "itc (match --method itc): mid_block at step 50, 64-d, trained with itc+rsc" in out
    code, out, err = run_cli_out("match", engine, tmp_path / "0.png", tmp_path / "1.png", "--text", "zero", "--text",
                                 "one", "--method", "itc", "-f", "json", "-b", "ort-cpu")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 2 and rows[0]["options"]["method"] == "itc" and set(rows[0]["scores"]) == {"zero", "one"}
    assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for r in rows for v in r["scores"].values())  # cosine similarities
