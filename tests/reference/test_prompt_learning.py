"""Prompt learning: the hinge loss, the LoRA merge (merged forward = adapter forward), seeded
determinism, export with the adapter merged (engine = torch reference with the adapter), learned
per-layer score weights (trained, recorded, used by the engine and the parity suite), CLI errors."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffscore
from diffscore.errors import EngineError
from diffscore.reference.loading import load_components
from diffscore.reference.matching import match_reference
from diffscore.reference.prompt_learning import (
    ADAPTER_FILE, Pairs, PromptLearningConfig, add_lora, hinge_loss, load_adapters, merge_lora, read_pairs,
    select_shots, train_prompts,
)
from diffscore.reference.scoring_unet import ScoringUNet

MERGE_ATOL = 1e-5
PARITY_RTOL = 1e-4
CAPTIONS = ["a cat", "a dog", "a car"]


def random_pairs(n_per_caption=2, size=8, seed=0) -> Pairs:
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size), dtype=np.uint8) for _ in range(n_per_caption * len(CAPTIONS))]
    return Pairs(images, [c for c in CAPTIONS for _ in range(n_per_caption)])


# a large lr, so that 3 steps move the adapter far enough to tell merged from unmerged scores
FAST = dict(shots=2, steps=3, lr=1e-2, batch_size=4)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("pairs")
    pairs = random_pairs()
    lines = []
    for i, (image, text) in enumerate(zip(pairs.images, pairs.captions)):
        Image.fromarray(image).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": text}))  # relative to the JSONL file
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def train_cli_args(model, pairs_file, out):
    return ["train-prompts", model, "--data", pairs_file, "--shots", FAST["shots"], "--out", out,
            "--train-steps", FAST["steps"], "--lr", FAST["lr"], "--batch-size", FAST["batch_size"]]


@pytest.fixture(scope="module")
def trained_run(tiny_models, pairs_file, tmp_path_factory):
    """A run made through the CLI from a JSONL file (the user's path)."""
    from diffscore.app import cli

    out = tmp_path_factory.mktemp("run") / "pl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["diffscore", *map(str, train_cli_args(tiny_models["pixel"], pairs_file, out))])
        cli.main()
    return out


def test_hinge_loss_on_a_constructed_case():
    pos = torch.tensor([1.0, 0.5, 0.2], requires_grad=True)
    neg = torch.tensor([[0.5, 0.95], [0.1, 0.2], [0.3, 0.1]], requires_grad=True)
    loss = hinge_loss(pos, neg, margin=0.1)
    # per image: max(0, 0.1 - 1 + 0.95) = 0.05; max(0, 0.1 - 0.5 + 0.2) = 0; max(0, 0.1 - 0.2 + 0.3) = 0.2
    assert loss.item() == pytest.approx((0.05 + 0.0 + 0.2) / 3, abs=1e-6)
    loss.backward()
    np.testing.assert_allclose(pos.grad, [-1 / 3, 0, -1 / 3], atol=1e-7)
    np.testing.assert_allclose(neg.grad, [[0, 1 / 3], [0, 0], [1 / 3, 0]], atol=1e-7)  # hardest negative only


@torch.no_grad()
def test_merged_forward_equals_adapter_forward(tiny_models):
    comp = load_components(tiny_models["pixel"])
    base_keys = set(comp.unet.state_dict())
    torch.manual_seed(0)
    params = add_lora(comp.unet)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in comp.unet.named_parameters() if "lora_" in n} \
        == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    for p in params:  # B starts at zero (an identity adapter): give it weight so the test means something
        p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    C, S, D = comp.unet.config.in_channels, comp.unet.config.sample_size, comp.unet.config.cross_attention_dim
    x, t, c = (torch.randn(3, C, S, S, generator=g), torch.tensor([5.0, 400.0, 990.0]),
               torch.randn(3, 16, D, generator=g))
    su = ScoringUNet(comp.unet).eval()
    eps_lora, attn_lora = su(x, t, c)
    comp.unet.disable_adapters()
    eps_base, _ = su(x, t, c)
    comp.unet.enable_adapters()
    assert (eps_lora - eps_base).abs().max() > 100 * MERGE_ATOL, "the adapter should change the output"
    merge_lora(comp.unet)
    assert set(comp.unet.state_dict()) == base_keys  # a plain UNet again: no LoRA layers left
    eps_merged, attn_merged = su(x, t, c)
    torch.testing.assert_close(eps_merged, eps_lora, rtol=0, atol=MERGE_ATOL)
    torch.testing.assert_close(attn_merged, attn_lora, rtol=0, atol=MERGE_ATOL)


def test_training_is_deterministic(tiny_models, pairs_file, trained_run, tmp_path):
    """The library call with the same seed and settings reproduces the CLI run's weights exactly."""
    again = tmp_path / "again"
    train_prompts(tiny_models["pixel"], read_pairs(pairs_file), again, PromptLearningConfig(**FAST), progress=False)
    a, b = load_file(str(trained_run / ADAPTER_FILE)), load_file(str(again / ADAPTER_FILE))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert max(a[k].abs().max() for k in a if "lora_B" in k) > 0, "training should move B away from zero"
    log = json.loads((trained_run / "training_log.json").read_text())
    assert len(log["loss"]) == FAST["steps"] and log["pairs"] == 6 and log["captions"] == CAPTIONS
    assert log["lora"]["rank"] == 4 and log["lora"]["target_modules"] == ["to_q", "to_k", "to_v", "to_out.0"]


def test_shots_per_caption():
    captions = ["a"] * 5 + ["b"] * 2
    idx = select_shots(captions, 3, seed=0)
    assert sorted(captions[i] for i in idx) == ["a", "a", "a", "b", "b"]
    with pytest.raises(EngineError, match="≥ 1"):
        select_shots(captions, 0)


def test_export_with_adapters_matches_reference(monkeypatch, tiny_models, trained_run, tmp_path):
    from diffscore.app import cli

    monkeypatch.setattr(sys, "argv", ["diffscore", "export", str(tiny_models["pixel"]), str(tmp_path / "eng"),
                                      "--adapters", str(trained_run)])
    cli.main()
    eng = diffscore.load(tmp_path / "eng", backend="ort-cpu")
    head = eng.manifest.adapters["prompt_learning"]
    assert head.lora_rank == 4 and head.merged and head.adapters == str(trained_run.resolve())
    images = random_pairs(seed=5).images[:3]
    got = eng.match(images, CAPTIONS, steps=3, seed=2)

    comp = load_components(tiny_models["pixel"])
    plain = match_reference(comp, ScoringUNet(comp.unet, eng.manifest.attention_layers), images, CAPTIONS, steps=3,
                            seed=2)
    load_adapters(comp.unet, trained_run)  # unmerged: the engine's merge is what is under test
    want = match_reference(comp, ScoringUNet(comp.unet, eng.manifest.attention_layers), images, CAPTIONS, steps=3,
                           seed=2)
    np.testing.assert_allclose(got, want, rtol=PARITY_RTOL)
    assert np.abs(want - plain).max() > 10 * PARITY_RTOL * np.abs(want).max(), "the adapter should change the scores"



@pytest.mark.parametrize("data,shots,exit_code,message", [
    ("{missing}", 2, 1, "does not exist"),
    ("--demo", 0, 2, "Invalid value for '--shots'"),
    ("{bad}", 2, 1, "is not a JSON object"),
    ("{one_caption}", 2, 1, "at least 2"),
])
def test_cli_errors_are_one_line(run_cli, tiny_models, tmp_path, data, shots, exit_code, message):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    (tmp_path / "one.jsonl").write_text('{"image": "a.png", "caption": "a cat"}\n' * 2)
    data = data.format(missing=tmp_path / "missing.jsonl", bad=tmp_path / "bad.jsonl",
                       one_caption=tmp_path / "one.jsonl")
    code, err = run_cli("train-prompts", tiny_models["pixel"], *([data] if data == "--demo" else ["--data", data]),
                        "--shots", shots, "--out", tmp_path / "run")
    assert code == exit_code and message in err
    assert len(err.strip().splitlines()) == 1, err


def test_export_refuses_a_folder_without_adapters(run_cli, tiny_models, tmp_path):
    code, err = run_cli("export", tiny_models["pixel"], tmp_path / "eng", "--adapters", tmp_path)
    assert code == 1 and "is not a prompt-learning run" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "eng").exists()


def test_cli_refuses_to_overwrite_a_run(run_cli, tiny_models, pairs_file, trained_run):
    code, err = run_cli(*train_cli_args(tiny_models["pixel"], pairs_file, trained_run))
    assert code == 1 and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_parity_suite_compares_with_the_adapted_reference(tiny_models, trained_run, tmp_path):
    """`diffscore parity` must merge the engine's adapter into the torch reference, else it compares unlike models."""
    from diffscore.engine.manifest import Manifest
    from diffscore.export.onnx_export import export_engine
    from diffscore.export.parity import run_parity

    engine_dir = export_engine(tiny_models["pixel"], tmp_path / "eng", adapters=trained_run, show_progress=False)
    lines = []
    assert run_parity(engine_dir, echo=lines.append), lines
    manifest = Manifest.load(engine_dir)
    manifest.adapters.pop("prompt_learning")  # forget the adapter: the plain reference no longer matches
    manifest.save(engine_dir)
    assert not run_parity(engine_dir, echo=lambda line: None)


def test_score_weights_are_learned_exported_and_used(run_cli, tiny_models, pairs_file, tmp_path):
    """--score-weights: a convex weight per scored layer, moved off uniform by training, recorded in the
    manifest, and the engine's DSD scores = the torch reference's with the adapter and those weights."""
    from diffscore.export.parity import run_parity

    run = tmp_path / "run"
    code, err = run_cli(*train_cli_args(tiny_models["pixel"], pairs_file, run), "--score-weights")
    assert code == 0, err
    learned = json.loads((run / "training_log.json").read_text())["score_weights"]
    w = np.array(list(learned.values()))
    assert len(w) >= 2 and abs(w.sum() - 1) < 1e-6 and (w > 0).all()
    assert np.ptp(w) > 1e-4, "training should move the weights off the uniform start"

    code, err = run_cli("export", tiny_models["pixel"], tmp_path / "eng", "--adapters", run)
    assert code == 0, err
    eng = diffscore.load(tmp_path / "eng", backend="ort-cpu")
    assert list(learned) == eng.manifest.attention_layers
    assert eng.manifest.adapters["prompt_learning"].score_weights == learned
    np.testing.assert_allclose(eng.layer_weights, w, rtol=1e-6)
    images = random_pairs(seed=5).images[:3]
    got = eng.match(images, CAPTIONS, steps=3, seed=2)

    comp = load_components(tiny_models["pixel"])
    load_adapters(comp.unet, run)
    scorer = ScoringUNet(comp.unet, eng.manifest.attention_layers)
    want = match_reference(comp, scorer, images, CAPTIONS, steps=3, seed=2, layer_weights=learned)
    mean = match_reference(comp, scorer, images, CAPTIONS, steps=3, seed=2)
    np.testing.assert_allclose(got, want, rtol=PARITY_RTOL)
    # 3 steps move the weights a little; the engine must still be far closer to weighted than to mean pooling
    assert np.abs(want - mean).max() > 100 * np.abs(got - want).max(), "the engine should pool with the weights"

    lines = []
    assert run_parity(tmp_path / "eng", echo=lines.append), lines
    assert any("match (prompt learning)" in line and line.startswith("PASSED") for line in lines), lines


def test_export_refuses_other_layers_than_the_weights_were_learned_on(run_cli, tiny_models, pairs_file, tmp_path):
    run = tmp_path / "run"
    assert run_cli(*train_cli_args(tiny_models["pixel"], pairs_file, run), "--score-weights", "--train-steps",
                   1)[0] == 0
    layers = json.loads((run / "training_log.json").read_text())["config"]["attention_layers"]
    code, err = run_cli("export", tiny_models["pixel"], tmp_path / "eng", "--adapters", run,
                        "--attention-layers", layers[0])
    assert code == 1 and "learned score weights" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "eng").exists()
