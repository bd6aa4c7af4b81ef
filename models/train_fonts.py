"""Train the 62-class glyph model shipped in models/fonts62/ (0-9, A-Z, a-z from many typefaces, 16x16).

Why: a benchmark that is not saturated and has enough classes to show how a strategy's cost grows with them
(the digits demo: 10 classes, 99.8 %). Same Stable Diffusion layout as the pixel demo (models/train_demo.py):
CLIP tokenizer (the demo's) + CLIPTextModel (the demo's size, warm-started from its weights) +
UNet2DConditionModel + DDPM scheduler, in pixel space. Trains on the "train" typefaces of
models/fonts_data.py only (validation and held-out typefaces are never seen here). Captions name the
character and the typeface's look ("the small letter g in a bold serif typeface"), or the character alone
("the small letter g": the classifier's prompt), or nothing (classifier-free guidance).

    .venv/bin/python models/fonts_data.py --out data/fonts62
    .venv/bin/python models/train_fonts.py --data data/fonts62 --out models/fonts62
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see train_demo.py: spinning OpenMP threads starve each other

import numpy as np
import torch
import torch.nn.functional as F

import diffusers
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from fonts_data import CHARS, SIZE, caption, char_name, load_split
from train_demo import build_scheduler, train_steps, warmup_steps

DEMO = Path(__file__).resolve().parent / "demo"
PLAIN_FRACTION = 0.3  # captions that name the character only (the classifier's prompts)
CAPTION_DROPOUT = 0.1
SHIFT_PROB = 0.5  # a random ±1 pixel shift, so the model does not learn one exact glyph placement


def build_unet() -> UNet2DConditionModel:
    """16x16 -> 8x8 -> 4x4; cross-attention at 8x8 and 4x4 only (attention at 16x16 is the slow part on a CPU)."""
    return UNet2DConditionModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)


def caption_table(tokenizer, looks: list[str]) -> torch.Tensor:
    """Token ids: row look*62 + char for "<char> in a <look> typeface", then 62 plain rows, then ""."""
    texts = [caption(c, lk) for lk in looks for c in CHARS] + [char_name(c) for c in CHARS] + [""]
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def caption_rows(rng, labels: np.ndarray, look_idx: np.ndarray, n_looks: int) -> np.ndarray:
    rows = look_idx * len(CHARS) + labels
    u = rng.random(len(labels))
    rows[u < PLAIN_FRACTION] = n_looks * len(CHARS) + labels[u < PLAIN_FRACTION]
    rows[u > 1 - CAPTION_DROPOUT] = (n_looks + 1) * len(CHARS)
    return rows


def shifted(rng, x: torch.Tensor) -> torch.Tensor:
    """Each image moved by up to one pixel in x and y with probability SHIFT_PROB (zero = black fill)."""
    out = x.clone()
    for i in np.flatnonzero(rng.random(len(x)) < SHIFT_PROB):
        dy, dx = rng.integers(-1, 2, size=2)
        padded = F.pad(x[i], (1, 1, 1, 1), value=-1.0)
        out[i] = padded[:, 1 + dy : 1 + dy + SIZE, 1 + dx : 1 + dx + SIZE]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder written by models/fonts_data.py")
    ap.add_argument("--out", default=str(Path(__file__).parent / "fonts62"))
    ap.add_argument("--steps", type=int, default=5000)  # the shipped model's: ~50 epochs, 53 min on 2 cores
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)

    images, labels, faces = load_split(args.data, "train")
    looks = sorted({f["look"] for f in faces})
    look_idx = np.array([looks.index(f["look"]) for f in faces])
    x_all = torch.from_numpy(images.astype(np.float32)[:, None] / 127.5 - 1.0)
    tokenizer = CLIPTokenizer.from_pretrained(DEMO / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(DEMO / "text_encoder")
    unet, scheduler = build_unet(), build_scheduler()
    ids_table = caption_table(tokenizer, looks)
    ema_loss, _, wall = train_steps(
        unet, text_encoder, scheduler, args, rng, len(x_all),
        lambda idx: (shifted(rng, x_all[idx]), ids_table[caption_rows(rng, labels[idx], look_idx[idx], len(looks))]))

    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    shutil.copy(DEMO / "model_index.json", out / "model_index.json")
    shutil.copy(Path(args.data) / "split.json", out / "split.json")
    log = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "lr_schedule": f"linear warmup {warmup_steps(args.steps)} + cosine to 0",
        "optimizer": "AdamW(weight_decay=0.01), grad clip 1.0", "wall_time_s": round(wall, 1),
        "final_loss_ema": round(ema_loss, 5), "train_images": len(x_all), "train_typefaces": len({f["file"] for f in faces}),
        "plain_caption_fraction": PLAIN_FRACTION, "caption_dropout": CAPTION_DROPOUT, "shift_prob": SHIFT_PROB,
        "looks": looks, "unet_params": sum(p.numel() for p in unet.parameters()),
        "text_encoder_params": sum(p.numel() for p in text_encoder.parameters()),
        "text_encoder_init": "models/demo/text_encoder",
        "torch_version": torch.__version__, "diffusers_version": diffusers.__version__,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {out} in {wall:.0f}s, final loss {ema_loss:.4f}")


if __name__ == "__main__":
    main()
