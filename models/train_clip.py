"""Build and train the small CLIP shipped in models/demo-clip/ (a transformers ``CLIPModel`` folder).

Why: UniDiff fine-tunes CLIP's image and text towers beside the diffusion model (`diffscore finetune --clip`),
and its reciprocal semantic consistency ties CLIP's visual features to the UNet's. The demo's diffusers folder
ships no image encoder, so this trains one here: a tiny CLIP (vision: 8x8 RGB, 2x2 patches; text: the demo's
tokenizer, 16 tokens) with CLIP's contrastive loss on the digits' TRAINING split (the same stratified
validation slice models/train_demo.py held back is held back here too; the held-out test split is never
touched), every caption template of the demo's training. Grey digits are fed as RGB, normalised with
OpenAI CLIP's mean and std, so the folder is an ordinary CLIP (CLIPImageProcessor + CLIPTokenizer beside it).

    .venv/bin/python models/train_clip.py --out models/demo-clip
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared 2-core box: sleep, do not spin, in OpenMP waits

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import transformers  # noqa: E402
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer  # noqa: E402

from diffscore.app.digits import (DEFAULT_TEMPLATE, TRAIN_TEMPLATES, caption, load_digits_split,  # noqa: E402
                                  validation_indices)

HERE = Path(__file__).parent
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's


def build_clip(max_length: int = 16, image_size: int = 8) -> CLIPModel:
    """Tiny CLIP: both towers 2 layers of width 32 (the text tower shaped like the demo's text encoder)."""
    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=2, num_channels=3, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32))


def image_processor(image_size: int = 8) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True)


def pixels(images: np.ndarray) -> torch.Tensor:
    """(N, 8, 8) uint8 grey -> (N, 3, 8, 8) CLIP-normalised, as CLIPImageProcessor makes them at size 8."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def soft_clip_loss(z_i: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, every same-digit pair of the batch a positive (soft targets)."""
    logits = scale * z_i @ z_t.T
    p = (labels[:, None] == labels[None, :]).float()
    p = p / p.sum(1, keepdim=True)
    return (-(p * logits.log_softmax(1)).sum(1).mean() - (p * logits.T.log_softmax(1)).sum(1).mean()) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "demo-clip"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = CLIPTokenizer.from_pretrained(HERE / "demo" / "tokenizer", local_files_only=True)
    L = int(tokenizer.model_max_length)
    model = build_clip(L)
    split = load_digits_split()
    fit, val = validation_indices(args.seed)
    x_fit, y_fit = pixels(split.train_images[fit]), torch.from_numpy(split.train_labels[fit])
    x_val, y_val = pixels(split.train_images[val]), split.train_labels[val]
    table = tokenizer([caption(d, t) for t in TRAIN_TEMPLATES for d in range(10)], padding="max_length", max_length=L,
                      truncation=True, return_tensors="pt").input_ids  # row = template * 10 + digit

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * s / args.steps)))
    model.train()
    t0, ema = time.time(), None
    bar = tqdm(range(args.steps), desc="train clip", mininterval=2)
    for _ in bar:
        idx = torch.from_numpy(rng.choice(len(x_fit), args.batch_size, replace=False))
        labels = y_fit[idx]
        ids = table[torch.from_numpy(rng.integers(len(TRAIN_TEMPLATES), size=len(idx))) * 10 + labels]
        z_i = F.normalize(model.get_image_features(pixel_values=x_fit[idx]).pooler_output, dim=-1)
        z_t = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
        loss = soft_clip_loss(z_i, z_t, labels, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
    wall = time.time() - t0

    model.eval()
    with torch.no_grad():  # 10-way zero-shot accuracy on the validation slice, per template
        z_i = F.normalize(model.get_image_features(pixel_values=x_val).pooler_output, dim=-1)
        z_t = F.normalize(model.get_text_features(input_ids=table).pooler_output, dim=-1)
        z_t = z_t.view(len(TRAIN_TEMPLATES), 10, -1)  # (templates, digits, dim)
        val_acc = {t: float(((z_i @ z_t[k].T).argmax(1).numpy() == y_val).mean())
                   for k, t in enumerate(TRAIN_TEMPLATES)}
        default = tokenizer([caption(d, DEFAULT_TEMPLATE) for d in range(10)], padding="max_length", max_length=L,
                            truncation=True, return_tensors="pt").input_ids
        z_d = F.normalize(model.get_text_features(input_ids=default).pooler_output, dim=-1)
        val_acc[DEFAULT_TEMPLATE] = float(((z_i @ z_d.T).argmax(1).numpy() == y_val).mean())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor().save_pretrained(out)
    log = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "lr_schedule": f"linear warmup {warmup} + cosine to 0",
           "optimizer": "AdamW(weight_decay=0.1), grad clip 1.0",
           "loss": "CLIP's symmetric InfoNCE, same-digit pairs positive (soft targets)",
           "templates": list(TRAIN_TEMPLATES),
           "train_size": len(fit), "val_size": len(val), "final_loss_ema": round(ema, 4), "wall_time_s": round(wall, 1),
           "val_accuracy_default_template": val_acc[DEFAULT_TEMPLATE], "val_accuracy_per_template": val_acc,
           "params": sum(p.numel() for p in model.parameters()), "torch_version": torch.__version__,
           "transformers_version": transformers.__version__}
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {out} in {wall:.0f}s, final loss {ema:.3f}, validation accuracy ({DEFAULT_TEMPLATE!r}) "
          f"{val_acc[DEFAULT_TEMPLATE]:.1%}")


if __name__ == "__main__":
    main()
