"""Full-size check (not in CI): the real Stable Diffusion 1.5 architecture with random weights.

Builds an SD 1.5-shaped model folder (UNet 860M params, CLIP ViT-L/14 text encoder, SD VAE), exports
it (the fp32 UNet exceeds 2 GB, so it goes to external data), runs one batch through ONNX Runtime and
torch, and reports export time, file sizes, peak memory, per-pass latency and parity.

    .venv/bin/python bench/export_sd.py [--workdir /tmp/sd15] [--batch 2]

Writes bench/results/export_sd.json. Needs ~15 GB RAM and ~10 GB disk; takes several minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "models" / "demo" / "tokenizer"


def build_sd15(folder: Path, tokenizer: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(  # the runwayml/stable-diffusion-v1-5 unet/config.json values
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ).save_pretrained(folder / "unet")
    CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14 text tower
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )).save_pretrained(folder / "text_encoder")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    ).save_pretrained(folder / "vae")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True).save_pretrained(folder / "scheduler")
    shutil.copytree(tokenizer, folder / "tokenizer")  # the real CLIP BPE vocabulary
    cfg = folder / "tokenizer" / "tokenizer_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "model_max_length": 77}))  # CLIP's context length
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/diffscore-sd15"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokenizer", type=Path, default=DEMO_TOKENIZER, help="a CLIP tokenizer folder")
    args = parser.parse_args()

    import torch

    from diffscore.engine.backends.onnxruntime import OnnxRuntimeRunner
    from diffscore.engine.manifest import Manifest
    from diffscore.export.onnx_export import export_engine
    from diffscore.export.verdicts import compare
    from diffscore.export.tensorrt_ops import unsupported_ops
    from diffscore.reference.loading import load_components
    from diffscore.reference.scoring_unet import ScoringUNet

    model, engine = args.workdir / "model", args.workdir / "engine"
    shutil.rmtree(args.workdir, ignore_errors=True)
    start = time.perf_counter()
    build_sd15(model, args.tokenizer)
    build_s = time.perf_counter() - start

    start = time.perf_counter()
    export_engine(model, engine)
    export_s = time.perf_counter() - start
    export_peak = peak_rss_gb()
    manifest = Manifest.load(engine)
    files = {p.name: p.stat().st_size / 1e9 for p in sorted(engine.iterdir())}

    comp = load_components(model)
    unet = ScoringUNet(comp.unet, manifest.attention_layers).eval()
    rng = np.random.default_rng(0)
    B = args.batch
    feed = {"sample": rng.standard_normal((B, 4, 64, 64), dtype=np.float32),
            "timestep": np.array([100.0, 700.0][:B] + [500.0] * max(0, B - 2), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((B, 77, 768), dtype=np.float32)}
    with torch.no_grad():
        tin = [torch.from_numpy(v) for v in feed.values()]
        unet(*tin)
        start = time.perf_counter()
        want = unet(*tin)
        torch_s = time.perf_counter() - start
    runner = OnnxRuntimeRunner(engine / manifest.graphs["unet"].file, manifest.graphs["unet"])
    runner.infer(feed)
    start = time.perf_counter()
    got = runner.infer(feed)
    ort_s = time.perf_counter() - start
    verdicts = [compare(f"unet:{n}", got[n], w.numpy(), 1e-4) for n, w in zip(["eps", "attn_scores"], want)]
    result = {
        "unet_params_M": sum(p.numel() for p in comp.unet.parameters()) / 1e6,
        "build_model_s": build_s, "export_s": export_s, "peak_rss_gb": max(export_peak, peak_rss_gb()),
        "files_gb": files, "unet_external_data": manifest.graphs["unet"].data_files,
        "batch": B, "torch_ms_per_pass": 1000 * torch_s / B, "ort_ms_per_pass": 1000 * ort_s / B,
        "ort_speedup": torch_s / ort_s,
        "parity": {v.name: {"max_abs": v.max_abs, "max_rel": v.max_rel, "passed": v.passed} for v in verdicts},
        "tensorrt_unsupported_ops": {g: unsupported_ops(engine / s.file) for g, s in manifest.graphs.items()},
    }
    path = write_result("export_sd", result)
    print(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
