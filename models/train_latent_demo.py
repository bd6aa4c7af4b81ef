"""Build and train the latent-space demo model shipped in models/demo-latent/.

Why: every real Stable Diffusion is latent, so the VAE path (encode, posterior mean, shift and scaling
factor, latent-sized UNet) must run on trained weights, not only random ones. This is the pixel demo's
task in Stable Diffusion's shape: the 8x8 digits brought to 32x32 by the engine's own preprocessing
(torchvision's bicubic Resize + CenterCrop), a small AutoencoderKL (1 -> 4 channels, 32x32 -> 8x8,
trained first with a reconstruction + small KL loss, its scaling factor set to 1 / std of the latents
as Stable Diffusion did), then a UNet on the 4x8x8 latents (the posterior means, as the engine encodes).
The text encoder and tokenizer are the pixel demo's, frozen (Stable Diffusion keeps CLIP frozen too).
Only the training split from diffscore.app.digits is used, minus the same validation slice as the pixel
demo; the held-out test split is never touched here.

    .venv/bin/python models/train_latent_demo.py --out models/demo-latent
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_demo.py: spinning OpenMP threads starve each other

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import diffusers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from diffscore.engine.images import preprocess_batch

from train_demo import (CAPTION_DROPOUT, batches, build_scheduler, build_unet, caption_rows, caption_table, cosine, load_data, noised,
                        optimiser_step)

PIXEL_DEMO = Path(__file__).resolve().parent / "demo"
IMAGE_SIZE = 32
KL_WEIGHT = 1e-4


def build_models() -> tuple[AutoencoderKL, UNet2DConditionModel, DDPMScheduler]:
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)
    return vae, build_unet(IMAGE_SIZE // 4, 4), build_scheduler()


def upscaled(x: np.ndarray) -> torch.Tensor:
    """(N,1,8,8) in [-1, 1] -> (N,1,32,32) exactly as the engine will see the same digits."""
    uint8 = np.round((x[:, 0] + 1.0) * 127.5).astype(np.uint8)
    return torch.from_numpy(preprocess_batch(list(uint8), IMAGE_SIZE, 1))


def train_vae(vae, images, args, rng) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = cosine(opt, args.vae_steps)
    vae.train()
    ema = None
    bar = tqdm(zip(range(args.vae_steps), batches(rng, len(images), args.vae_batch_size)), total=args.vae_steps,
               desc="vae", mininterval=2)
    for _, idx in bar:
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.mse_loss(recon, x)
        loss = rec + KL_WEIGHT * posterior.kl().mean() / x[0].numel()
        optimiser_step(opt, sched, loss, vae.parameters())
        ema = rec.item() if ema is None else 0.98 * ema + 0.02 * rec.item()
        bar.set_postfix(recon=f"{ema:.4f}", refresh=False)
    vae.eval()
    return {"steps": args.vae_steps, "batch_size": args.vae_batch_size, "final_recon_mse_ema": round(ema, 5),
            "kl_weight": KL_WEIGHT}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "demo-latent"))
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--vae-batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)

    tokenizer = CLIPTokenizer.from_pretrained(PIXEL_DEMO / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(PIXEL_DEMO / "text_encoder").eval().requires_grad_(False)
    vae, unet, scheduler = build_models()
    x_tr, y_tr, x_val, _ = load_data(args.seed)
    images, val_images = upscaled(x_tr), upscaled(x_val)

    t0 = time.time()
    vae_log = train_vae(vae, images, args, rng)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        vae_log["val_recon_mse"] = round(F.mse_loss(vae.decode(vae.encode(val_images).latent_dist.mean).sample,
                                                    val_images).item(), 5)
    scaling = float(1.0 / mean.std())  # Stable Diffusion's recipe: unit-variance latents for the UNet
    vae.register_to_config(scaling_factor=scaling)
    latents = mean * scaling

    with torch.no_grad():
        cond_table = text_encoder(caption_table(tokenizer)).last_hidden_state
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    sched = cosine(opt, args.steps)
    alphas_cumprod = scheduler.alphas_cumprod
    unet.train()
    ema = None
    bar = tqdm(zip(range(args.steps), batches(rng, len(latents), args.batch_size)), total=args.steps, desc="unet",
               mininterval=2)
    for _, idx in bar:
        x0 = latents[idx]
        rows = caption_rows(rng, y_tr[idx])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),))
        noise = torch.randn_like(x0)
        loss = F.mse_loss(unet(noised(alphas_cumprod, x0, t, noise), t, cond_table[rows]).sample, noise)
        optimiser_step(opt, sched, loss, unet.parameters())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
    wall = time.time() - t0

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    vae.save_pretrained(tmp / "vae")
    shutil.copytree(PIXEL_DEMO / "text_encoder", tmp / "text_encoder")
    shutil.copytree(PIXEL_DEMO / "tokenizer", tmp / "tokenizer")
    scheduler.save_pretrained(tmp / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    log = {
        "image_size": IMAGE_SIZE, "latent_shape": list(latents.shape[1:]), "vae": vae_log, "scaling_factor": scaling,
        "unet_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "optimizer": "AdamW(weight_decay=0.01), grad clip 1.0, warmup + cosine",
        "seed": args.seed, "threads": args.threads, "wall_time_s": round(wall, 1), "final_loss_ema": round(ema, 5),
        "train_size": len(x_tr), "caption_dropout": CAPTION_DROPOUT, "text_encoder": "models/demo's, frozen",
        "vae_params": sum(p.numel() for p in vae.parameters()), "unet_params": sum(p.numel() for p in unet.parameters()),
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
    }
    (tmp / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"saved {out} in {wall:.0f}s, VAE val recon MSE {vae_log['val_recon_mse']}, UNet loss {ema:.4f}")


if __name__ == "__main__":
    main()
