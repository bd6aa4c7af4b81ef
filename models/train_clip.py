"""Build and train the small CLIP shipped in models/demo-clip/ (a transformers ``CLIPModel`` folder).

Why: UniDiff fine-tunes CLIP's image and text towers beside the diffusion model (`diffscore finetune --clip`),
and its reciprocal semantic consistency ties CLIP's visual features to the UNet's. The demo's diffusers folder
ships no image encoder, so this trains one here: a tiny CLIP (vision: 8x8 RGB, 2x2 patches; text: the demo's
tokenizer, 16 tokens) with CLIP's contrastive loss on the digits' TRAINING split (the same stratified
validation slice models/train_demo.py held back is held back here too; the held-out test split is never
touched), every caption template of the demo's training. Grey digits are fed as RGB, normalised with
OpenAI CLIP's mean and std, so the folder is an ordinary CLIP (CLIPImageProcessor + CLIPTokenizer beside it).

    .venv/bin/python models/train_clip.py --out models/demo-clip

With --data glyphs, the same for the 62-class glyph model (models/fonts62-clip, for bench/finetune.py --clip on
the glyphs): 16x16 glyphs of the training typefaces (models/fonts_data.py, rendered from the installed font
packages), 4x4 patches, each glyph captioned by its class name or its typeface's style caption (the glyph model's
own training captions); 62-way validation accuracy on the validation typefaces, never the held-out ones.

    .venv/bin/python models/train_clip.py --data glyphs --out models/fonts62-clip
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
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


def build_clip(max_length: int = 16, image_size: int = 8, patch_size: int = 2) -> CLIPModel:
    """Tiny CLIP: both towers 2 layers of width 32 (the text tower shaped like the demo's text encoder)."""
    return CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=49406,
                         eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        projection_dim=32))


def image_processor(image_size: int = 8) -> CLIPImageProcessor:
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=True)


def pixels(images: np.ndarray) -> torch.Tensor:
    """(N, S, S) uint8 grey -> (N, 3, S, S) CLIP-normalised, as CLIPImageProcessor makes them at size S."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None].expand(-1, 3, -1, -1)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def soft_clip_loss(z_i: torch.Tensor, z_t: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, every same-digit pair of the batch a positive (soft targets)."""
    logits = scale * z_i @ z_t.T
    p = (labels[:, None] == labels[None, :]).float()
    p = p / p.sum(1, keepdim=True)
    return (-(p * logits.log_softmax(1)).sum(1).mean() - (p * logits.T.log_softmax(1)).sum(1).mean()) / 2


@dataclass(frozen=True)
class ClipData:
    """Training images with the captions each may take (indices into `captions`), and the validation images with
    the class prompts of each validation template (template -> one caption per class)."""
    x_fit: np.ndarray
    y_fit: np.ndarray
    captions: list[str]
    choices: np.ndarray  # (N, m): the captions image i is trained with, drawn uniformly
    x_val: np.ndarray
    y_val: np.ndarray
    val_prompts: dict[str, list[str]]
    default_template: str
    image_size: int
    patch_size: int
    note: dict


def digits_data(seed: int) -> ClipData:
    """The digits' training split minus models/train_demo.py's validation slice; every demo training template."""
    split = load_digits_split()
    fit, val = validation_indices(seed)
    captions = [caption(d, t) for t in TRAIN_TEMPLATES for d in range(10)]  # row = template * 10 + digit
    y_fit = split.train_labels[fit]
    choices = np.arange(len(TRAIN_TEMPLATES))[None, :] * 10 + y_fit[:, None]
    prompts = {t: [caption(d, t) for d in range(10)] for t in (*TRAIN_TEMPLATES, DEFAULT_TEMPLATE)}
    return ClipData(split.train_images[fit], y_fit, captions, choices, split.train_images[val],
                    split.train_labels[val], prompts, DEFAULT_TEMPLATE, 8, 2,
                    {"templates": list(TRAIN_TEMPLATES)})


def glyph_data(seed: int) -> ClipData:
    """The glyph model's training typefaces (its own training captions: the class name or the style caption);
    validation: the validation typefaces."""
    import sys

    sys.path.insert(0, str(HERE))
    from fonts_data import CHARS, CLASS_NAMES, arrays, build
    from fonts_data import caption as glyph_caption

    faces = build()
    data = arrays(faces)
    train, val = data["train"], data["validation"]
    looks = [tf.look for tf, _ in faces if tf.split == "train"]
    styled = [glyph_caption(CHARS[y], looks[f]) for y, f in zip(train["labels"], train["font"])]
    captions = list(dict.fromkeys([*CLASS_NAMES, *styled]))
    index = {c: i for i, c in enumerate(captions)}
    choices = np.stack([train["labels"], [index[c] for c in styled]], axis=1)
    return ClipData(train["images"], train["labels"], captions, choices, val["images"], val["labels"],
                    {"{}": list(CLASS_NAMES)}, "{}", 16, 4,
                    {"captions": "the class name or the typeface's style caption, equally likely",
                     "train_typefaces": len(looks)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=("digits", "glyphs"), default="digits")
    ap.add_argument("--out", default=None, help="default: models/demo-clip (digits), models/fonts62-clip (glyphs)")
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
    data = (glyph_data if args.data == "glyphs" else digits_data)(args.seed)
    model = build_clip(L, data.image_size, data.patch_size)
    x_fit, y_fit = pixels(data.x_fit), torch.from_numpy(data.y_fit)
    x_val, y_val = pixels(data.x_val), data.y_val
    table = tokenizer(data.captions, padding="max_length", max_length=L, truncation=True,
                      return_tensors="pt").input_ids
    choices = torch.from_numpy(data.choices)

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
        ids = table[choices[idx, torch.from_numpy(rng.integers(choices.shape[1], size=len(idx)))]]
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
    val_acc = {}
    with torch.no_grad():  # zero-shot accuracy on the validation images, per template
        z_i = F.normalize(model.get_image_features(pixel_values=x_val).pooler_output, dim=-1)
        for template, prompts in data.val_prompts.items():
            ids = tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
            z_t = F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
            val_acc[template] = float(((z_i @ z_t.T).argmax(1).numpy() == y_val).mean())
    out = Path(args.out or HERE / ("fonts62-clip" if args.data == "glyphs" else "demo-clip"))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor(data.image_size).save_pretrained(out)
    default = data.default_template
    log = {"data": args.data, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
           "lr_schedule": f"linear warmup {warmup} + cosine to 0",
           "optimizer": "AdamW(weight_decay=0.1), grad clip 1.0",
           "loss": "CLIP's symmetric InfoNCE, same-class pairs positive (soft targets)", **data.note,
           "train_size": len(data.x_fit), "val_size": len(data.x_val), "final_loss_ema": round(ema, 4),
           "wall_time_s": round(wall, 1), "val_accuracy_default_template": val_acc[default],
           "val_accuracy_per_template": val_acc, "params": sum(p.numel() for p in model.parameters()),
           "torch_version": torch.__version__, "transformers_version": transformers.__version__}
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved {out} in {wall:.0f}s, final loss {ema:.3f}, validation accuracy ({default!r}) "
          f"{val_acc[default]:.1%}")


if __name__ == "__main__":
    main()
