"""SDXL-layout models end to end on a tiny random-weight SDXL folder built here: the text conditioning against
diffusers' own StableDiffusionXLPipeline.encode_prompt / _get_add_time_ids, then export, info --verify, parity,
classify (stages and race) and match against the torch reference, a head, and INT8 calibration. One engine is
exported once for the module (with its head) and shared."""

import json
import shutil

import numpy as np
import pytest
import torch

from diffscore.engine.engine import load
from diffscore.engine.manifest import Manifest
from diffscore.errors import EngineError
from diffscore.export.onnx_export import export_engine
from diffscore.reference.loading import encode_conditioning, load_components

STAGES = [[4, 2], [8, 1]]  # small: the classifier's decisions, not its accuracy, are under test
LABELS = ["red square", "blue circle", "green tree"]


def build_tiny_sdxl(path, tokenizer_dir, seed: int = 0):
    """What an SDXL base folder holds, tiny: a text_time UNet (transformer depth 1 and 2, linear projections),
    CLIPTextModel + CLIPTextModelWithProjection of different widths, two tokenizers (the second pads with "!",
    as SDXL's does), an Euler scheduler and a VAE with SDXL's scaling factor."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text = dict(vocab_size=49408, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    CLIPTextModel(CLIPTextConfig(hidden_size=16, **text)).save_pretrained(path / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=8, **text)).save_pretrained(
        path / "text_encoder_2")
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), cross_attention_dim=16 + 24, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 8,
    ).save_pretrained(path / "unet")
    shutil.copytree(tokenizer_dir, path / "tokenizer")
    shutil.copytree(tokenizer_dir, path / "tokenizer_2")
    config = path / "tokenizer_2" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "pad_token": "!"}))
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        path / "scheduler")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        scaling_factor=0.13025,
    ).save_pretrained(path / "vae")
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    return path


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory, demo_model):
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "model", demo_model / "tokenizer")


@pytest.fixture(scope="module")
def sdxl_comp(sdxl_model):
    """The torch reference components, loaded once for the module."""
    return load_components(sdxl_model)


@pytest.fixture(scope="module")
def sdxl_runtime(sdxl_engine):
    """The exported engine on ONNX Runtime's CPU provider, loaded once for the module."""
    with load(sdxl_engine, backend="ort-cpu") as eng:
        yield eng


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of 4 random 16x16 RGB images, one subfolder each (train-head's --data layout)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("sdxl-images")
    rng = np.random.default_rng(0)
    for c, label in enumerate(("dark", "light")):
        (root / label).mkdir()
        for i in range(4):
            pixels = rng.integers(0, 128, (16, 16, 3)) + 127 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / label / f"{i}.png")
    return root


def pngs(folder) -> list:
    return sorted(folder.rglob("*.png"))


@pytest.fixture(scope="module")
def sdxl_engine(sdxl_model, image_folder, tmp_path_factory, run_cli_module):
    """`diffscore train-head` on the folder, then one export (fp32 + fp16, with the head, small classifier stages),
    shared by the tests below."""
    root = tmp_path_factory.mktemp("sdxl-engine")
    head = root / "tone"
    code, err = run_cli_module("train-head", sdxl_model, "--data", image_folder, "--kind", "linear", "--blocks",
                               "mid_block", "--noise-steps", "50,400", "--epochs", "3", "--out", head)
    assert code == 0, err
    return export_engine(sdxl_model, root / "engine", precisions=("fp32", "fp16"), heads=[head],
                         defaults={"stages": STAGES, "strategy": "stages"}, show_progress=False)


@pytest.fixture(scope="module")
def run_cli_module():
    """In-process `diffscore ARGS...` for module fixtures: (exit code, stderr text)."""
    import contextlib
    import io

    from diffscore.app import cli

    def run(*args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                cli.main([*map(str, args)])
                code = 0
            except SystemExit as e:
                code = e.code or 0
        return code, err.getvalue()

    return run


def test_conditioning_is_diffusers_sdxl_pipelines(sdxl_comp, sdxl_runtime):
    """prompt_embeds, pooled_prompt_embeds and add_time_ids from diffusers' own pipeline = the reference's
    conditioning = the runtime's (exported text encoder graph, both tokenizer.json files, manifest time ids)."""
    from diffusers import StableDiffusionXLPipeline

    comp = sdxl_comp
    pipe = StableDiffusionXLPipeline(vae=comp.vae, text_encoder=comp.text_encoder, text_encoder_2=comp.text_encoder_2,
                                     tokenizer=comp.tokenizer, tokenizer_2=comp.tokenizer_2, unet=comp.unet,
                                     scheduler=comp.scheduler)
    prompts = ["a red square", "", "a photo of a blue circle on a very long and winding road home"]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), dtype=torch.float32,
                                      text_encoder_projection_dim=8).expand(len(prompts), -1)
    assert comp.tokenizer_2.pad_token_id != comp.tokenizer.pad_token_id  # the two paddings really differ
    want = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids}
    ref = encode_conditioning(comp, prompts)
    assert set(ref) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(ref[name], value, rtol=0, atol=0)
    got = sdxl_runtime.text_conditioning(prompts)
    assert set(got) == set(want)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_manifest_and_info_verify(sdxl_engine, run_cli_out):
    m = Manifest.load(sdxl_engine)
    assert (m.conditioning, m.tokenizer_2, m.time_ids) == ("sdxl", "tokenizer_2.json",
                                                           [16.0, 16.0, 0.0, 0.0, 16.0, 16.0])
    assert [t.name for t in m.graphs["unet"].inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                        "time_ids"]
    assert [t.name for t in m.graphs["text_encoder"].inputs] == ["input_ids", "input_ids_2"]
    assert m.text_hidden_size == 40 and "tokenizer_2.json" in m.files
    code, out, err = run_cli_out("info", sdxl_engine, "--verify")
    assert code == 0, err
    assert "conditioning: sdxl" in out and "text_embeds, time_ids" in out


def test_every_graph_parses_in_tensorrt_and_plans_run(sdxl_engine, sdxl_runtime, image_folder, tmp_path):
    """Every SDXL graph uses only TensorRT-parsable ops (checked everywhere); with TensorRT and a GPU, fp32 plans
    of the text encoder (two id inputs) and the UNet (text_embeds, time_ids) give ONNX Runtime's scores."""
    from diffscore.export.tensorrt_build import build_plans, tensorrt_available
    from diffscore.export.tensorrt_ops import unsupported_ops

    for name, graph in Manifest.load(sdxl_engine).graphs.items():
        assert unsupported_ops(sdxl_engine / graph.file) == {}, name
    if (why := tensorrt_available()) is not None:
        pytest.skip(f"needs TensorRT and a GPU: {why}")
    engine = shutil.copytree(sdxl_engine, tmp_path / "engine")
    build_plans(engine, "fp32", opt_batch=4, max_batch=16)
    images = pngs(image_folder)[:2]
    with load(engine, backend="tensorrt") as eng:
        got = eng.classify(images, LABELS, seed=2)
    want = sdxl_runtime.classify(images, LABELS, seed=2)
    for g, w in zip(got, want):
        np.testing.assert_allclose([s for _, s in g.ranking], [s for _, s in w.ranking], rtol=1e-3)


def test_parity_tensors_and_decisions(sdxl_engine, image_folder, run_cli_out):
    """Every graph (fp32, fp16, the head) against torch, and classify decisions against the torch reference."""
    code, out, err = run_cli_out("parity", sdxl_engine, image_folder / "*" / "*.png", "--labels", ",".join(LABELS),
                                 "--limit", "4")
    assert code == 0, out + err
    assert "FAILED" not in out and "text_encoder:text_embeds" in out and "head.tone" in out
    assert "ort-cpu fp32 decisions | top-1 agreement with torch fp32 = 100.00% on 4" in out


@pytest.mark.parametrize("strategy", ["stages", "race"])
def test_classify_equals_torch_reference(sdxl_comp, sdxl_runtime, image_folder, strategy):
    from diffscore.kernels import RaceConfig
    from diffscore.reference.classifier import classify_reference

    images = pngs(image_folder)[:3]
    race = RaceConfig(round_size=4, min_rounds=1, budget=24)
    opts = dict(stages=[tuple(s) for s in STAGES], strategy=strategy, seed=3, timesteps=12)
    got = sdxl_runtime.classify(images, LABELS, **opts, z=race.z, round_size=race.round_size,
                                min_rounds=race.min_rounds, budget=race.budget, use_profile=False)
    want = classify_reference(sdxl_comp, images, LABELS, **opts, race=race)
    for g, w in zip(got, want):
        assert g.label == w.label and g.passes == w.passes
        np.testing.assert_allclose([s for _, s in g.ranking], [s for _, s in w.ranking], rtol=1e-4)


def test_match_equals_torch_reference(sdxl_comp, sdxl_runtime, image_folder):
    from diffscore.reference.matching import match_reference
    from diffscore.reference.scoring_unet import ScoringUNet

    images = pngs(image_folder)[:2]
    eng, comp = sdxl_runtime, sdxl_comp
    got = eng.match(images, LABELS, steps=3, seed=1)
    want = match_reference(comp, ScoringUNet(comp.unet, eng.manifest.attention_layers), images, LABELS, steps=3,
                           seed=1, preset=eng.manifest.defaults.dsd_preset)
    np.testing.assert_allclose(got.scores, want, rtol=1e-4, atol=1e-5)


def test_head_classifies(sdxl_engine, image_folder, run_cli_out):
    code, out, err = run_cli_out("classify", sdxl_engine, image_folder / "*" / "*.png", "--method", "head", "--format",
                                 "json")
    assert code == 0, err
    rows = json.loads(out)
    assert len(rows) == 8 and {r["label"] for r in rows} <= {"dark", "light"}


def test_calibrate_int8(sdxl_engine, image_folder, tmp_path, run_cli_out):
    engine = shutil.copytree(sdxl_engine, tmp_path / "engine")
    code, out, err = run_cli_out("calibrate", engine, *pngs(image_folder), "--labels", ",".join(LABELS), "--samples",
                                 "16", "--validation", "2")
    assert code == 0, out + err
    m = Manifest.load(engine)
    assert ("unet.int8" in m.graphs
            and [t.name for t in m.graphs["unet.int8"].inputs][-2:] == ["text_embeds", "time_ids"])
    with load(engine, backend="ort-cpu", precision="int8") as eng:
        assert len(eng.classify(pngs(image_folder)[:2], LABELS)) == 2


def test_prompt_learning_refused_in_one_line(sdxl_model, sdxl_comp, tmp_path):
    from diffscore.reference.prompt_learning import Pairs, train_prompts

    pairs = Pairs(images=[np.zeros((16, 16, 3), np.uint8)] * 2, captions=["a", "b"])
    with pytest.raises(EngineError, match="prompt learning does not build sdxl") as info:
        train_prompts(sdxl_model, pairs, tmp_path / "p", comp=sdxl_comp)
    assert "\n" not in str(info.value) and not (tmp_path / "p").exists()


@pytest.mark.parametrize("change,reason", [
    (lambda m: shutil.rmtree(m / "tokenizer_2"), "has SDXL text_time conditioning but .* has no tokenizer_2/"),
    (lambda m: shutil.rmtree(m / "text_encoder"), "is an SDXL refiner"),
])
def test_incomplete_sdxl_folders_refused(sdxl_model, tmp_path, change, reason):
    model = shutil.copytree(sdxl_model, tmp_path / "m")
    change(model)
    with pytest.raises(EngineError, match=reason):
        export_engine(model, tmp_path / "e", show_progress=False)
    assert not (tmp_path / "e").exists()


def test_inconsistent_conditioning_in_a_manifest_is_one_line(sdxl_engine, tmp_path):
    raw = json.loads((sdxl_engine / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**raw, "time_ids": None}))
    with pytest.raises(EngineError, match="conditioning 'sdxl' with tokenizer_2 'tokenizer_2.json' and time_ids None"):
        Manifest.load(tmp_path)
    old = {k: v for k, v in raw.items() if k not in ("conditioning", "tokenizer_2", "time_ids")}
    m = Manifest(**old)  # a manifest written before these fields existed reads as an SD engine
    assert (m.conditioning, m.tokenizer_2, m.time_ids) == ("sd", None, None)
