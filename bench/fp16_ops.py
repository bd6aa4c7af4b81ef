"""Which ops must stay fp32 in the FP16 UNet: error with all candidates kept fp32, with each one
released, and with none kept, on real demo inputs (held-out digits noised at real timesteps, real
prompt embeddings). Writes bench/results/fp16_ops.json.

    .venv/bin/python bench/fp16_ops.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

import diffscore  # noqa: E402
from diffscore.app.demo import demo_engine_dir  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split  # noqa: E402
from diffscore.export.fp16 import FP32_OPS, fp16_sensitivity  # noqa: E402
from diffscore.kernels import add_noise  # noqa: E402


def main() -> None:
    engine_dir = demo_engine_dir()
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    rng = np.random.default_rng(0)
    images = load_digits_split().test_images[:64]
    x0 = eng.encode_images(list(images))
    ts = rng.integers(0, len(eng.alphas_cumprod), len(x0))
    eps = rng.standard_normal(x0.shape, dtype=np.float32)
    x_t = np.stack([add_noise(x0[i], eps[i : i + 1], eng.alphas_cumprod, ts[i : i + 1])[0] for i in range(len(x0))])
    prompts = [DEFAULT_TEMPLATE.format(CLASS_NAMES[i % 10]) for i in range(len(x0))]
    feed = {"sample": x_t, "timestep": ts.astype(np.float32), "encoder_hidden_states": eng.encode_text(prompts)}
    report = fp16_sensitivity(engine_dir / "unet.onnx", feed, candidates=FP32_OPS)
    path = write_result("fp16_ops",
                        {"candidates": list(FP32_OPS), "inputs": "64 held-out digits, random t", "report": report})
    print(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
