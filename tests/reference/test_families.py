"""Model folders as real checkpoints ship them: fp16-variant weights load; families diffscore cannot score
correctly are refused in one line that names the reason, before anything is written."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from diffscore.errors import EngineError
from diffscore.export.onnx_export import export_engine
from diffscore.reference.loading import encode_images, load_components


def make_fp16_variant(src, dst):
    """What `variant="fp16"` downloads give: every weight file is `<name>.fp16.safetensors`, no plain file."""
    model = shutil.copytree(src, dst)
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)):
        module = cls.from_pretrained(model / sub).half()
        shutil.rmtree(model / sub)
        module.save_pretrained(model / sub, variant="fp16")
    return model


def test_fp16_variant_folder_loads_with_its_weights(tiny_models, tmp_path):
    model = make_fp16_variant(tiny_models["sd1"], tmp_path / "m")
    assert (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (model / "unet" / "diffusion_pytorch_model.safetensors").exists()
    comp, plain = load_components(model), load_components(tiny_models["sd1"])
    for a, b in ((comp.unet, plain.unet), (comp.text_encoder, plain.text_encoder), (comp.vae, plain.vae)):
        for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
            assert p.dtype == torch.float32, name  # loaded as fp32 for the reference and export
            torch.testing.assert_close(p, q.half().float(), rtol=0, atol=0)


def test_two_variants_and_no_plain_weights_is_refused(tiny_models, tmp_path):
    model = make_fp16_variant(tiny_models["sd1"], tmp_path / "m")
    w = model / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    shutil.copyfile(w, w.with_name("diffusion_pytorch_model.ema.safetensors"))
    with pytest.raises(EngineError, match="weight variants ema, fp16 and no plain weights"):
        load_components(model)


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def inpainting(model):
    cfg = json.loads((model / "unet" / "config.json").read_text())
    shutil.rmtree(model / "unet")
    UNet2DConditionModel.from_config({**cfg, "in_channels": 9}).save_pretrained(model / "unet")


def depth(model):
    edit_json(model / "unet" / "config.json", in_channels=5)


def class_conditional(model):
    edit_json(model / "unet" / "config.json", class_embed_type="timestep")


def flow_matching(model):
    from diffusers import FlowMatchEulerDiscreteScheduler

    shutil.rmtree(model / "scheduler")
    FlowMatchEulerDiscreteScheduler().save_pretrained(model / "scheduler")


def transformer(model):  # an SD3 / Flux-style folder: transformer/ instead of unet/
    (model / "unet").rename(model / "transformer")
    edit_json(model / "transformer" / "config.json", _class_name="SD3Transformer2DModel")
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                        "transformer": ["diffusers", "SD3Transformer2DModel"]}))


def sdxl_one_encoder(model):  # SDXL's UNet without text_encoder_2/ (the supported layout: tests/export/test_sdxl.py)
    edit_json(model / "unet" / "config.json", addition_embed_type="text_time", addition_time_embed_dim=8)


def image_embeds(model):  # Kandinsky-style image-embedding conditioning
    edit_json(model / "unet" / "config.json", addition_embed_type="image")


@pytest.mark.parametrize("family,reason", [
    (inpainting, "takes 9 input channels but the VAE makes 4: an inpainting / depth"),
    (depth, "takes 5 input channels but the VAE makes 4"),
    (class_conditional, "is class-conditional"),
    (flow_matching, "flow-matching scheduler"),
    (transformer, "transformer denoiser"),
    (sdxl_one_encoder, "has SDXL text_time conditioning but"),
    (image_embeds, "addition_embed_type='image' inputs"),
])
def test_refused_families_write_nothing(tiny_models, tmp_path, run_cli, family, reason):
    model = shutil.copytree(tiny_models["sd1"], tmp_path / "model")
    family(model)
    out = tmp_path / "engines" / "e"
    out.parent.mkdir()
    with pytest.raises(EngineError, match=reason) as info:
        export_engine(model, out, show_progress=False)
    assert "\n" not in str(info.value)
    code, err = run_cli("export", model, out)
    assert code == 1 and reason.split(":")[0] in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []  # no engine, no partial folder


def test_shift_factor_vae(tiny_models, tmp_path):
    """x0 = (posterior mean − shift_factor) · scaling_factor, in the reference and in the exported VAE graph."""
    import onnxruntime as ort

    model = shutil.copytree(tiny_models["sd1"], tmp_path / "m")
    edit_json(model / "vae" / "config.json", shift_factor=0.25, scaling_factor=0.5)
    comp = load_components(model)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean = comp.vae.encode(pixels).latent_dist.mean
    want = ((mean - 0.25) * 0.5).numpy()
    np.testing.assert_allclose(encode_images(comp, pixels).numpy(), want, rtol=1e-6)
    engine = export_engine(model, tmp_path / "e", show_progress=False)
    sess = ort.InferenceSession(str(engine / "vae_encoder.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"image": pixels.numpy()})[0], want, rtol=1e-4, atol=1e-5)
