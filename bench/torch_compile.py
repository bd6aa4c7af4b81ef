"""Does `torch.compile` make the torch reference faster on this CPU? The demo classification job
(the stages bench/classify.py uses) with the eager UNet and with `torch.compile(unet, dynamic=True)`
(inductor), one intra-op thread, in interleaved rounds so background load hits both alike; the compile
time (first call) is reported separately.

    .venv/bin/python bench/torch_compile.py [--images 16] [--rounds 3]

Writes bench/results/torch_compile.json. The first call compiles (minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from diffscore.app.demo import DEMO_LOSS, DEMO_MODEL, DEMO_STAGES  # noqa: E402
from diffscore.app.digits import CLASS_NAMES, DEFAULT_TEMPLATE, load_digits_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="held-out digits per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from diffscore.reference.classifier import classify_reference
    from diffscore.reference.loading import load_components

    torch.set_num_threads(1)  # bench/classify.py's faster setting on this shared 2-core machine
    images = list(load_digits_split().test_images[: args.images])
    eager = load_components(DEMO_MODEL)
    compiled = copy.copy(eager)
    compiled.unet = torch.compile(eager.unet, dynamic=True)

    def run(comp, imgs):
        with torch.inference_mode():
            start = time.perf_counter()
            out = classify_reference(comp, imgs, list(CLASS_NAMES), templates=[DEFAULT_TEMPLATE], stages=DEMO_STAGES,
                                     loss=DEMO_LOSS, seed=0)
            return time.perf_counter() - start, [r.label for r in out]

    run(eager, images[:2])  # warm-up
    compile_s, _ = run(compiled, images[:2])  # compiles (and recompiles for the batch sizes it meets)
    seconds, labels = {"eager": 0.0, "compiled": 0.0}, {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for name, comp in (("eager", eager), ("compiled", compiled)):
            s, got = run(comp, images)
            seconds[name] += s
            labels[name] += got
    n = args.images * args.rounds
    result = {"images": n, "stages": DEMO_STAGES, "torch_threads": 1, "first_call_with_compile_s": compile_s,
              "images_per_s": {k: n / v for k, v in seconds.items()},
              "compiled_speedup": seconds["eager"] / seconds["compiled"],
              "same_decisions": labels["eager"] == labels["compiled"]}
    path = write_result("torch_compile", result)
    print(result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
