"""Peak memory of classification against the number of images: 100 and 2,000 photos of 512 x 512 on an
engine with 64 x 64 x 4 latents (a tiny random-weight SD-layout model: the VAE (4 channels) and UNet are
small so 2,000 images take minutes, the images and latents are Stable Diffusion's size). Each run is a fresh process \
that classifies a generator
of file paths with `Engine.classify_iter`; the figure is its peak resident set size (ru_maxrss).

    .venv/bin/python bench/memory.py [--update-docs]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, machine_line, update_docs, write_result  # noqa: E402

COUNTS = (100, 2000)
SIZE = 512
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import diffscore
engine_dir, folder, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
paths = (folder / f"{i % 100}.jpg" for i in range(n))  # a generator: the caller holds no list of images
start = time.perf_counter()
with diffscore.load(engine_dir, backend="ort-cpu") as engine:
    seen = sum(1 for _ in engine.classify_iter(paths, ["a cat", "a dog"], stages=[(1, 1)]))
print(json.dumps({"images": seen, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "seconds": time.perf_counter() - start}))
"""


def build_model(path: Path) -> Path:
    """A random-weight SD-layout folder whose VAE maps 512 x 512 x 3 to 64 x 64 x 4."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         cross_attention_dim=16, norm_num_groups=8, attention_head_dim=2,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(path / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(4, 4, 4, 4), norm_num_groups=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  sample_size=SIZE).save_pretrained(path / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=49407)).save_pretrained(path / "text_encoder")
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "demo" / "tokenizer", path / "tokenizer")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(path / "scheduler")
    (path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return path


def write_photos(folder: Path, n: int = 100) -> None:
    """n smooth 512 x 512 colour JPEGs (the runs cycle through them: decoding cost is per image anyway)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update-docs", action="store_true")
    args = parser.parse_args()
    from diffscore.export.onnx_export import export_engine

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        engine_dir = export_engine(build_model(tmp / "model"), tmp / "engine", show_progress=False)
        (tmp / "photos").mkdir()
        write_photos(tmp / "photos")
        rows = []
        for n in COUNTS:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(engine_dir), str(tmp / "photos"), str(n)],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {"image_size": SIZE, "latent": [4, 64, 64], "rows": rows}
    path = write_result("memory", result)
    print(f"wrote {path}")
    if args.update_docs:
        lines = ["| images (512 × 512 JPEG, a generator of paths) | peak RSS | wall |", "|---:|---:|---:|"]
        lines += [f"| {r['images']:,} | {r['peak_rss_mb']:.0f} MB | {r['seconds']:.0f} s |" for r in rows]
        lines.append("")
        lines.append(f"`Engine.classify_iter`, stages [(1, 1)], 2 labels, a tiny random-weight SD-layout model with "
                     f"64 × 64 × 4 latents, ONNX Runtime CPU, each count in a fresh process. Measured on "
                     f"{machine_line(machine())} by `bench/memory.py`.")
        update_docs("memory", "\n".join(lines))


if __name__ == "__main__":
    main()
