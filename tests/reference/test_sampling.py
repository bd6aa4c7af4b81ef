"""The sampler against diffusers' own StableDiffusionPipeline (same scheduler, seeds, guidance → same
latents and images), pixel space included (a pipeline around a one-level VAE, scale factor 1, output_type
"latent", so the VAE is never used); the synthetic set's seeds, saving and errors."""

import numpy as np
import pytest
import torch

from diffscore.errors import EngineError
from diffscore.reference.loading import load_components
from diffscore.reference.sampling import (SAMPLERS, SampleOptions, make_scheduler, sample, save_samples, saved_record,
                                          synthesize, to_uint8)

PROMPTS = ["a cat", "a dog", "a cat"]


@pytest.fixture(scope="module")
def comps(tiny_models):
    return {k: load_components(tiny_models[k]) for k in ("sd1", "pixel")}


def pipeline(comp, sampler):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = comp.vae or AutoencoderKL(in_channels=1, out_channels=1, latent_channels=1, block_out_channels=(8,),
                                    norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                                    up_block_types=("UpDecoderBlock2D",))  # scale factor 1: latents = pixels
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=comp.text_encoder, tokenizer=comp.tokenizer, unet=comp.unet,
                                   scheduler=make_scheduler(comp, sampler), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.scheduler = make_scheduler(comp, sampler)  # after __init__, which rewrites an old-style config (steps_offset)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("kind", ["sd1", "pixel"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_sampler_equals_diffusers_pipeline(comps, kind, sampler):
    comp = comps[kind]
    opts = SampleOptions(sampler=sampler, steps=4, guidance=2.5, seed=7, batch_size=2)  # two batches: 2 + 1
    ours = sample(comp, PROMPTS, opts, decode=False)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
    theirs = pipeline(comp, sampler)(PROMPTS, num_inference_steps=4, guidance_scale=2.5, generator=gens,
                                     output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if kind == "sd1":  # decoded images too: the pipeline's [0, 1] output is ours mapped from [-1, 1]
        gens = [torch.Generator().manual_seed(7 + i) for i in range(len(PROMPTS))]
        image = pipeline(comp, sampler)(PROMPTS, num_inference_steps=4, guidance_scale=2.5, generator=gens,
                                        output_type="pt").images
        torch.testing.assert_close((sample(comp, PROMPTS, opts) + 1) / 2, image, rtol=1e-4, atol=1e-5)


def test_no_guidance_at_scale_one(comps):
    comp = comps["pixel"]
    ours = sample(comp, PROMPTS[:2], SampleOptions(sampler="ddim", steps=3, guidance=1.0), decode=False)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    theirs = pipeline(comp, "ddim")(PROMPTS[:2], num_inference_steps=3, guidance_scale=1.0, generator=gens,
                                    output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_synthetic_sets_nest_and_save(comps, tmp_path):
    comp, opts = comps["pixel"], SampleOptions(steps=2, seed=3)
    small, y_small, _ = synthesize(comp, ["cat", "dog"], 1, "a {}", opts)
    big, y_big, record = synthesize(comp, ["cat", "dog"], 3, "a {}", opts)
    assert list(y_big) == [0, 0, 0, 1, 1, 1] and list(y_small) == [0, 1]
    np.testing.assert_array_equal(small[0], big[0])  # the first n per class of a larger set = the set of n
    np.testing.assert_array_equal(small[1], big[3])
    assert big[0].shape == (8, 8) and big[0].dtype == np.uint8
    assert (record.source, record.per_class, record.images, record.template) == ("synthetic", 3, 6, "a {}")
    out = save_samples(big, y_big, ["cat", "dog"], record, tmp_path / "samples")
    from diffscore.engine.images import image_folder, preprocess_batch

    paths, labels, classes = image_folder(out)
    assert classes == ["cat", "dog"] and labels == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(preprocess_batch(paths, 8, 1), preprocess_batch(big, 8, 1))  # PNG is lossless
    assert saved_record(out) == record
    with pytest.raises(EngineError, match="already exists"):
        save_samples(big, y_big, ["cat", "dog"], record, out)


def test_to_uint8_matches_pipeline_postprocessing():
    from diffusers.image_processor import VaeImageProcessor

    x = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    theirs = VaeImageProcessor().postprocess(x, output_type="np")  # (N, H, W, C) in [0, 1]
    np.testing.assert_array_equal(np.stack(to_uint8(x)), (theirs * 255).round().astype(np.uint8))


@pytest.mark.parametrize("bad, message", [
    (dict(per_class=0), "at least 1 image"),
    (dict(labels=["cat"]), "at least two labels"),
    (dict(template="no braces"), "{}"),
    (dict(options=SampleOptions(sampler="euler")), "unknown sampler"),
    (dict(options=SampleOptions(steps=0)), "steps"),
    (dict(options=SampleOptions(guidance=float("nan"))), "guidance"),
])
def test_synthesize_refuses_in_one_line(comps, bad, message):
    args = dict(labels=["cat", "dog"], per_class=1, template="a {}", options=SampleOptions(steps=1)) | bad
    with pytest.raises(EngineError, match=message) as e:
        synthesize(comps["pixel"], **args)
    assert "\n" not in str(e.value)
