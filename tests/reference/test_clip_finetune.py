"""UniDiff with CLIP (`finetune --clip`, reference/clip_finetune.py, export/clip_itc.py, engine/scorers/itc.py): ITC
against transformers' own CLIP loss, RSC against a hand computation on hooked UNet features, the CLIP features served by
the engine against transformers' `CLIPModel.get_image_features` (pixels from `CLIPImageProcessor`), and the
user's path end to end through the CLI. A tiny CLIP is built in the test (no download)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffscore.reference.loading import load_components

CAPTIONS = ["zero", "one", "two"]
SIZE = 8  # the tiny CLIP's image size; the test images are this size, so no resize differs between the two paths


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, demo_model):
    """A random tiny transformers CLIPModel folder with the demo's tokenizer and an image-processor config."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407,
                         pad_token_id=49407),
        vision_config=dict(image_size=SIZE, patch_size=2, num_channels=3, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        projection_dim=12))
    out = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(out)
    CLIPTokenizer.from_pretrained(demo_model / "tokenizer", local_files_only=True).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                       image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                       do_convert_rgb=True).save_pretrained(out)
    return out


def _digits(n: int, seed: int = 0) -> list[np.ndarray]:
    """n grey 8x8 uint8 images: smooth blobs, so CLIP sees structure, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(1, 7), rng.uniform(1, 7), rng.uniform(1.5, 4)
        out.append((255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)).astype(np.uint8))
    return out


def _processor_pixels(clip_dir, images) -> torch.Tensor:
    """transformers' own preprocessing (CLIPImageProcessor from the folder)."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
    return proc(images=[Image.fromarray(im) for im in images], return_tensors="pt").pixel_values


def _ce_rows(logits: np.ndarray, target: np.ndarray) -> float:
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-(target * logp).sum(axis=1).mean())


def test_itc_is_clips_loss_and_rsc_by_hand(tiny_models, clip_dir):
    from diffusers import DDPMScheduler

    from diffscore.engine.images import preprocess_batch
    from diffscore.reference.clip_finetune import ClipBranches, clip_pixels, load_clip
    from diffscore.reference.finetune import FinetuneConfig

    comp = load_components(tiny_models["pixel"])
    clip, tok, spec = load_clip(clip_dir)
    images = _digits(3)
    px = _processor_pixels(clip_dir, images)
    torch.testing.assert_close(clip_pixels(images, spec), px, rtol=1e-5, atol=1e-5)  # our pixels are CLIP's
    branches = ClipBranches(comp, FinetuneConfig(blocks=["mid_block"], clip=str(clip_dir)), CAPTIONS, clip, tok, spec)
    head = torch.nn.Linear(32, 12)  # the pixel UNet's mid_block has 32 channels
    x0 = torch.from_numpy(preprocess_batch(images, comp.image_size, comp.image_channels))
    t, eps = torch.tensor([10, 300, 700]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    captured = []
    hook = comp.unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        parts = branches.losses(head, x0, px, torch.arange(3), t, eps)
        # ITC with three distinct captions is exactly CLIP's own contrastive loss (transformers' return_loss)
        ids = tok(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        ref = clip(input_ids=ids, pixel_values=px, return_loss=True)
        # RSC by hand: diffusers' noising, the UNet on the captions (transformers' text encoder), mid_block's output
        x_t = DDPMScheduler.from_pretrained(tiny_models["pixel"], subfolder="scheduler").add_noise(x0, eps, t)
        hidden = comp.text_encoder(comp.tokenizer(CAPTIONS, padding="max_length", max_length=16,
                                                  return_tensors="pt").input_ids).last_hidden_state
        captured.clear()
        comp.unet(x_t, t, encoder_hidden_states=hidden)
    hook.remove()
    branches.unet.tap.remove_hooks()
    assert float(parts["itc"]) == pytest.approx(float(ref.loss), rel=1e-5)
    pooled = captured[0].mean(dim=(2, 3)).double().numpy()  # (3, 32)
    u = pooled @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    z = ref.image_embeds.double().numpy()  # transformers' normalised image embeddings
    logits = clip.logit_scale.exp().item() * z @ u.T
    expected = (_ce_rows(logits, np.eye(3)) + _ce_rows(logits.T, np.eye(3))) / 2
    assert float(parts["rsc"]) == pytest.approx(expected, rel=1e-4)
    assert float(parts["is"]) > 0


@pytest.fixture(scope="module")
def clip_run(tiny_models, clip_dir, tmp_path_factory):
    """The user's path through the CLI: pairs.jsonl -> finetune --clip -> export --adapters."""
    from PIL import Image

    from diffscore.app import cli

    work = tmp_path_factory.mktemp("clip-run")
    lines = []
    for i, image in enumerate(_digits(12, seed=2)):
        Image.fromarray(image).save(work / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": CAPTIONS[i % 3]}))
    (work / "pairs.jsonl").write_text("\n".join(lines))
    run, engine = work / "run", work / "engine"
    for args in (["finetune", tiny_models["pixel"], "--data", work / "pairs.jsonl", "--clip", clip_dir, "--shots", "3",
                  "--out", run, "--train-steps", "3", "--batch-size", "6", "--val-shots", "1", "--clip-lr", "1e-2"],
                 ["export", tiny_models["pixel"], engine, "--adapters", run]):
        try:
            cli.main([*map(str, args)])
        except SystemExit as e:
            assert not e.code, f"{args[0]} exited {e.code}"
    return work, run, engine


def test_cli_finetune_clip_exports_clip_towers(clip_run, clip_dir, capsys):
    from transformers import CLIPModel

    import diffscore
    from diffscore.app import cli

    work, run, engine_dir = clip_run
    log = json.loads((run / "training_log.json").read_text())
    assert set(log["loss"]) == {"itc", "is", "rsc"} and log["clip"]["dir"] == "clip"
    tuned = CLIPModel.from_pretrained(run / "clip", local_files_only=True)
    source = CLIPModel.from_pretrained(clip_dir, local_files_only=True)
    assert not torch.equal(tuned.visual_projection.weight, source.visual_projection.weight)  # the towers trained
    with diffscore.load(engine_dir, backend="ort-cpu") as engine:
        assert engine.manifest.itc.kind == "clip" and engine.manifest.itc.tokenizer == "clip_tokenizer.json"
    capsys.readouterr()
    cli.main(["info", str(engine_dir)])
    assert "itc (match --method itc): CLIP towers (8x8 images, 16 tokens), 12-d, trained with itc+is+rsc" in \
        capsys.readouterr().out
    cli.main(["match", str(engine_dir), str(work / "0.png"), str(work / "1.png"), "--text", "zero", "--text", "one",
              "--method", "itc", "-f", "json", "-b", "ort-cpu"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and rows[0]["options"]["method"] == "itc" and set(rows[0]["scores"]) == {"zero", "one"}
    assert rows[0]["options"]["timesteps"] == []  # no noise step: CLIP sees the image itself


def test_served_clip_features_equal_transformers(clip_run):
    """itc_image's `features` = CLIPModel.get_image_features; match(method="itc") = transformers' cosine similarities
    (pixels from CLIPImageProcessor, ids from CLIPTokenizer); top-1 decisions all agree; parity's verdicts pass."""
    import onnxruntime as ort
    from transformers import CLIPModel, CLIPTokenizer

    import diffscore
    from diffscore.engine.manifest import Manifest
    from diffscore.export.itc import itc_parity

    work, run, engine_dir = clip_run
    images = _digits(20, seed=5)
    px = _processor_pixels(run / "clip", images)
    clip = CLIPModel.from_pretrained(run / "clip", local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(run / "clip", local_files_only=True)
    texts = ["zero", "one", "two", "a handwritten digit seven"]
    with torch.no_grad():
        want_f = clip.get_image_features(pixel_values=px)
        want_f = want_f if isinstance(want_f, torch.Tensor) else want_f.pooler_output
        t_f = clip.get_text_features(input_ids=tok(texts, padding="max_length", max_length=16,
                                                   return_tensors="pt").input_ids)
        t_f = t_f if isinstance(t_f, torch.Tensor) else t_f.pooler_output
    session = ort.InferenceSession(str(engine_dir / "itc_image.onnx"), providers=["CPUExecutionProvider"])
    got_f = session.run(["features"], {"pixel_values": px.numpy()})[0]
    np.testing.assert_allclose(got_f, want_f.numpy(), rtol=1e-4, atol=1e-5)
    want = (F.normalize(want_f, dim=-1) @ F.normalize(t_f, dim=-1).T).double().numpy()
    with diffscore.load(engine_dir, backend="ort-cpu") as engine:
        got = engine.match(images, texts, method="itc").scores
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()
    verdicts = itc_parity(engine_dir, Manifest.load(engine_dir), None, images)
    assert verdicts and all(v.passed for v in verdicts), [str(v) for v in verdicts]  # scores + decisions per backend
    assert {v.images for v in verdicts if v.decisions} == {len(images)}


def test_clip_mistakes_are_one_line(tiny_models, tmp_path, run_cli, clip_dir):
    code, err = run_cli("finetune", tiny_models["pixel"], "--demo", "--shots", "1", "--out", tmp_path / "r",
                        "--clip", tmp_path / "nope")
    assert code == 2 and "--clip expects a local CLIPModel folder" in err and "Traceback" not in err
    code, err = run_cli("finetune", tiny_models["pixel"], "--demo", "--shots", "1", "--out", tmp_path / "r",
                        "--clip", tiny_models["pixel"] / "text_encoder")
    assert code == 1 and "model_type 'clip'" in err and "Traceback" not in err


def test_shipped_demo_clip_reads_the_held_out_digits(demo_model):
    """models/demo-clip (models/train_clip.py) is a CLIPModel folder our loader takes, and it knows the digits."""
    from diffscore.app.digits import DEFAULT_TEMPLATE, caption, load_digits_split
    from diffscore.reference.clip_finetune import clip_similarity

    split = load_digits_split()
    images, labels = list(split.test_images[:60]), split.test_labels[:60]
    scores = clip_similarity(demo_model.parent / "demo-clip", images, [caption(c, DEFAULT_TEMPLATE) for c in range(10)])
    assert (scores.argmax(axis=1) == labels).mean() >= 0.9
