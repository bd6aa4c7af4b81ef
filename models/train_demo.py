"""Build and train the demo text-to-image diffusion model shipped in models/demo/.

Why: the project needs a real Stable-Diffusion-shaped pipeline (CLIP tokenizer + CLIPTextModel +
UNet2DConditionModel + DDPM scheduler, diffusers folder layout) that is small enough to train in
minutes on a 2-core CPU and to run hundreds of UNet passes per image, so that the zero-shot
Diffusion Classifier (lowest denoising error over the class prompts wins) can be demonstrated and
tested end to end. It works in pixel space (no VAE) on scikit-learn's 8x8 digits and trains only on
the fixed training split from diffscore.app.digits (a seeded validation slice of it is held back
too); the held-out test split is never touched here.

    .venv/bin/python models/train_demo.py --out models/demo
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# Sleep instead of spin in OpenMP barriers: on a shared 2-core box, spinning threads of two torch
# processes starve each other (measured 4-10x slower steps); must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import diffusers
import transformers
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffscore.app.digits import TRAIN_TEMPLATES, caption, load_digits_split

MAX_LENGTH = 16
CAPTION_DROPOUT = 0.1  # empty caption "", so the model also learns the unconditional eps(x_t, t, {})
VAL_FRACTION = 0.1
BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def fetch_bpe(workdir: str) -> bytes:
    """open_clip's BPE vocabulary, read out of its wheel (importing open_clip needs torchvision)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "open_clip_torch==3.3.0",
                    "-d", workdir], check=True)
    wheel = next(Path(workdir).glob("open_clip_torch-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(BPE_FILE)


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode character table (as in open_clip's SimpleTokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(bpe_gz: bytes, workdir: str) -> CLIPTokenizer:
    """vocab.json + merges.txt exactly as open_clip's SimpleTokenizer builds them (49,408 tokens)."""
    merges = gzip.decompress(bpe_gz).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = Path(workdir, "vocab.json"), Path(workdir, "merges.txt")
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=MAX_LENGTH, pad_token="<|endoftext|>")
    # Also bake "pad/truncate to 16" into tokenizer.json, so a bare `tokenizers` runtime encodes alike.
    tokenizer.backend_tokenizer.enable_truncation(MAX_LENGTH)
    tokenizer.backend_tokenizer.enable_padding(length=MAX_LENGTH, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    return tokenizer


def build_unet(sample_size: int = 8, channels: int = 1) -> UNet2DConditionModel:
    """The demo UNet (the latent demo's too, on 4-channel latents)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         prediction_type="epsilon")


def optimiser_step(opt, sched, loss, params) -> None:
    """AdamW step with gradients clipped at 1.0, then the learning-rate schedule's."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def warmup_steps(steps: int) -> int:
    return max(1, min(100, steps // 10))


def cosine(opt, steps: int):
    """Linear warm-up over warmup_steps(steps), then cosine to 0."""
    warmup = warmup_steps(steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))


def batches(rng, n: int, batch_size: int):
    """Index batches in a deterministic order: a fresh seeded permutation every epoch."""
    while True:
        perm = rng.permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def caption_rows(rng, labels: np.ndarray) -> np.ndarray:
    """caption_table rows for a batch: a random template per image, the empty caption (the last row) with
    probability CAPTION_DROPOUT (classifier-free guidance)."""
    rows = rng.integers(len(TRAIN_TEMPLATES), size=len(labels)) * 10 + labels
    rows[rng.random(len(labels)) < CAPTION_DROPOUT] = len(TRAIN_TEMPLATES) * 10
    return rows


def noised(alphas_cumprod: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (the DDPM forward process)."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def train_steps(unet, text_encoder, scheduler, args, rng, n: int, batch) -> tuple[float, float, float]:
    """The denoising loop of the pixel trainers (this one, train_fonts.py): UNet and text encoder trained together,
    ε-MSE at uniform t; `batch(index array) -> (x0, caption token ids)`. Returns (loss EMA, last loss, seconds)."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    sched = cosine(opt, args.steps)
    unet.train()
    text_encoder.train()
    t0, ema_loss = time.time(), None
    bar = tqdm(zip(range(args.steps), batches(rng, n, args.batch_size)), total=args.steps, desc="train", mininterval=2)
    for step, idx in bar:
        x0, ids = batch(idx)
        cond = text_encoder(ids).last_hidden_state
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),))
        noise = torch.randn_like(x0)
        loss = F.mse_loss(unet(noised(scheduler.alphas_cumprod, x0, t, noise), t, cond).sample, noise)
        optimiser_step(opt, sched, loss, params)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema_loss:.4f}", refresh=False)
    return ema_loss, loss.item(), time.time() - t0


def build_models() -> tuple[CLIPTextModel, UNet2DConditionModel, DDPMScheduler]:
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    return text_encoder, build_unet(), build_scheduler()


def load_data(seed: int):
    """Training split as float (N,1,8,8) in [-1, 1], minus a seeded stratified validation slice."""
    from sklearn.model_selection import train_test_split

    split = load_digits_split()
    x = split.train_images.astype(np.float32)[:, None] / 127.5 - 1.0
    x_tr, x_val, y_tr, y_val = train_test_split(x, split.train_labels, test_size=VAL_FRACTION, random_state=seed,
                                                stratify=split.train_labels)
    return x_tr, y_tr, x_val, y_val


def caption_table(tokenizer: CLIPTokenizer) -> torch.Tensor:
    """Token ids for every (template, label) caption, plus the empty caption in the last row."""
    texts = [caption(label, tpl) for tpl in TRAIN_TEMPLATES for label in range(10)] + [""]
    return tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "demo"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bpe", help="path to bpe_simple_vocab_16e6.txt.gz (default: fetch the open_clip wheel)")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)

    with tempfile.TemporaryDirectory() as tmp:
        bpe_gz = Path(args.bpe).read_bytes() if args.bpe else fetch_bpe(tmp)
        tokenizer = build_tokenizer(bpe_gz, tmp)
    text_encoder, unet, scheduler = build_models()
    ids_table = caption_table(tokenizer)
    x_tr, y_tr, x_val, y_val = load_data(args.seed)
    images = torch.from_numpy(x_tr)
    ema_loss, last_loss, wall = train_steps(unet, text_encoder, scheduler, args, rng, len(images),
                                            lambda idx: (images[idx], ids_table[caption_rows(rng, y_tr[idx])]))

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    model_index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"],
        "vae": [None, None], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    log = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lr_schedule": f"linear warmup {warmup_steps(args.steps)} + cosine to 0",
        "optimizer": "AdamW(weight_decay=0.01), grad clip 1.0", "seed": args.seed, "wall_time_s": round(wall, 1),
        "final_loss_ema": round(ema_loss, 5), "final_loss_last_batch": round(last_loss, 5),
        "train_size": len(x_tr), "val_size": len(x_val), "val_fraction_of_train_split": VAL_FRACTION,
        "caption_dropout": CAPTION_DROPOUT, "templates": list(TRAIN_TEMPLATES),
        "unet_params": sum(p.numel() for p in unet.parameters()),
        "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
        "config": {"unet": "block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4",
                   "text_encoder": "CLIP hidden 32, 2 layers, 4 heads, max_len 16",
                   "scheduler": "DDPM linear betas 1e-4..0.02, 1000 steps, epsilon"},
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {out} in {wall:.0f}s, final loss {ema_loss:.4f}")


if __name__ == "__main__":
    main()
