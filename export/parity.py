"""The parity suite (DESIGN.md §4): the same feed through torch and every available backend and
precision; tensor errors per output, then top-1 agreement of Diffusion Classifier decisions.

One greppable line per verdict (Polygraphy style), then a summary. Relative error is
max|a − b| / max|b| per output (elementwise ratios are meaningless where the reference is ~0).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch

from diffscore.engine.backends.choice import make_runner
from diffscore.engine.engine import load
from diffscore.engine.graph_contract import (IMAGE, LOGITS, SAMPLE, TEXT_ENCODER, TIMESTEP, UNET, UNET_EPS, VAE_ENCODER,
                                             ModelDims, diffdis_graph_contract, graph_contracts, head_graph_contract)
from diffscore.engine.manifest import PRECISIONS, Manifest, unet_graph
from diffscore.engine.progress import progress_bar
from diffscore.errors import EngineError
from diffscore.export.graphs import VaeEncoderGraph, text_encoder_graph
from diffscore.export.itc import itc_parity
from diffscore.export.verdicts import RTOL, Verdict, agreement, compare
from diffscore.reference.loading import load_components
from diffscore.reference.runner import TorchRunner
from diffscore.reference.scoring_unet import ScoringUNet

log = logging.getLogger("diffscore")


def available_backends(manifest: Manifest) -> list[str]:
    from diffscore.engine.backends.onnxruntime import gpu_backends
    from diffscore.engine.backends.tensorrt_plans import matching_plan

    found = ["ort-cpu", *sorted(gpu_backends())]
    if any(matching_plan(manifest, g) for g in manifest.graphs):
        found.append("tensorrt")
    from diffscore.engine.backends.openvino import openvino_version

    if openvino_version():
        found.append("openvino")
    return found


def precisions_on(backend: str, manifest: Manifest, variant: str) -> list[str]:
    """The precisions a graph variant runs at on a backend: its own, and bf16 for the fp32 UNet on OpenVINO
    where the CPU has bf16 instructions."""
    precisions = [manifest.graphs[variant].precision]
    if backend == "openvino" and variant == UNET:
        from diffscore.engine.backends.openvino import cpu_has_bf16

        precisions += ["bf16"] if cpu_has_bf16() else []
    return precisions


def torch_modules(comp, manifest: Manifest) -> dict[str, torch.nn.Module]:
    modules = {}
    if UNET_EPS in manifest.graphs:  # a plain UNet (diffusers' own attention): the scoring one below would
        modules[UNET_EPS] = ScoringUNet(copy.deepcopy(comp.unet), [])  # install its processors on a shared one
    modules.update({TEXT_ENCODER: text_encoder_graph(comp),
                    UNET: ScoringUNet(comp.unet, manifest.attention_layers, manifest.feature_blocks)})
    if comp.vae is not None:
        modules[VAE_ENCODER] = VaeEncoderGraph(comp.vae)
    return modules


def feeds(manifest: Manifest, comp, engine_dir: Path, seed: int = 0, batch: int = 6, images=None) -> dict[str, dict]:
    """Per graph: fresh random inputs, and real ones (tokenized prompts, encoded images, x_t at real t)."""
    rng = np.random.default_rng(seed)
    contracts = graph_contracts(ModelDims.of(manifest))  # each graph role's sample feed
    random = {role: c.sample_feed(batch, rng) for role, c in contracts.items()
              if role in manifest.graphs and role != UNET_EPS}
    if UNET_EPS in manifest.graphs:  # the ε̂-only graph takes the scoring graph's inputs
        random[UNET_EPS] = random[UNET]
    # real inputs, made by the runtime's own preprocessing on the CPU backend
    eng = load(engine_dir, backend="ort-cpu")
    images = real_images(manifest, batch, rng, images)
    prompts = [f"a photo of a {w}" for w in ("cat", "dog", "seven", "three", "car", "tree")][:batch]
    x0 = eng.encode_images(images)
    ts = rng.integers(0, len(manifest.alphas_cumprod), batch)
    from diffscore.kernels import add_noise

    eps = rng.standard_normal(x0.shape, dtype=np.float32)
    x_t = np.stack([add_noise(x0[i], eps[i : i + 1], eng.alphas_cumprod, ts[i : i + 1])[0] for i in range(batch)])
    real = {TEXT_ENCODER: eng.token_feed(prompts),
            UNET: {SAMPLE: x_t, TIMESTEP: ts.astype(np.float32), **eng.text_conditioning(prompts)}}
    if UNET_EPS in manifest.graphs:
        real[UNET_EPS] = real[UNET]
    if VAE_ENCODER in manifest.graphs:
        from diffscore.engine.images import preprocess_batch

        real[VAE_ENCODER] = {IMAGE: preprocess_batch(images, manifest.image_size, manifest.image_channels)}
    return {"random": random, "real": real}


def real_images(manifest: Manifest, n: int, rng, images=None) -> list:
    """The first n of the caller's images (repeated when it gives fewer); smooth random images when it gives none."""
    if images:
        return [images[i % len(images)] for i in range(n)]
    size = manifest.image_size
    base = rng.integers(0, 256, (n, 4, 4, manifest.image_channels), dtype=np.uint8)
    from PIL import Image

    return [np.asarray(Image.fromarray(b.squeeze(-1) if b.shape[-1] == 1 else b).resize((size, size), Image.BICUBIC))
            for b in base]


def tensor_parity(engine_dir: Path, manifest: Manifest, comp, images=None, progress: bool = False) -> list[Verdict]:
    """Each graph's feed through the torch runner and through every backend's runner of every precision."""
    torch_runners = {g: TorchRunner(m, manifest.graphs[g], g) for g, m in torch_modules(comp, manifest).items()}
    verdicts = []
    all_feeds = feeds(manifest, comp, engine_dir, images=images)
    checks = [(kind, graph, feed) for kind, per_graph in all_feeds.items() for graph, feed in per_graph.items()]
    with progress_bar("parity: tensors", len(checks), progress) as advance:
        for kind, graph, feed in checks:
            advance(0, f"({graph}, {kind})")
            want = torch_runners[graph].infer(feed)
            variants = [g for g in manifest.graphs if g == graph or g.startswith(f"{graph}.")]
            for backend in available_backends(manifest):
                for variant, precision in ((v, p) for v in variants for p in precisions_on(backend, manifest, v)):
                    try:
                        runner = make_runner(engine_dir, manifest, variant, backend, 0, None, precision=precision)
                    except EngineError as e:
                        log.warning("skip %s on %s: %s", variant, backend, e)
                        continue
                    with runner:
                        got = runner.infer(feed)
                    for spec in manifest.graphs[variant].outputs:
                        verdicts.append(compare(f"{backend} {precision} {graph}:{spec.name} ({kind})",
                                                got[spec.name], want[spec.name], RTOL.get(precision)))
            advance()
    return verdicts


def torch_head(engine_dir: Path, manifest: Manifest, name: str):
    """The torch head rebuilt from the weights and config the engine ships beside its graph."""
    from diffscore.reference.heads import load_head

    spec = manifest.heads[name]
    return load_head(engine_dir, weights=spec.weights, config=spec.config)


def head_parity(engine_dir: Path, manifest: Manifest, comp, seed: int = 0, batch: int = 6,
                images=None) -> list[Verdict]:
    """Per head and backend: its graph on random x_t against the same torch graph, and the whole head
    path (images -> logits) against torch features through the torch head. Head graphs are fp32."""
    from diffscore.export.graphs import HeadGraph
    from diffscore.reference.heads import head_logits_reference
    from diffscore.reference.loading import encode_conditioning

    rng = np.random.default_rng(seed)
    images = real_images(manifest, batch, rng, images)
    verdicts = []
    for name, spec in manifest.heads.items():
        head, config = torch_head(engine_dir, manifest, name)
        sample = head_graph_contract(ModelDims.of(manifest), len(spec.steps), len(spec.labels)).sample_feed(
            batch, rng)[SAMPLE]
        module = HeadGraph(comp.unet, head, config, encode_conditioning(comp, [config.features.prompt])).eval()
        with torch.no_grad():
            want = module(torch.from_numpy(sample)).numpy()
        module.unet.remove_hooks()
        want_real = head_logits_reference(comp, head, config, images).numpy()
        for backend in available_backends(manifest):
            eng = load(engine_dir, backend=backend)
            got = eng.runner(name).infer({SAMPLE: sample})[LOGITS]
            verdicts.append(compare(f"{backend} fp32 {spec.graph}:logits (random)", got, want, RTOL["fp32"]))
            verdicts.append(compare(f"{backend} fp32 {spec.graph}:logits (real images, end to end)",
                                    eng.head_logits(images, name), want_real, RTOL["fp32"]))
    return verdicts


def head_decision_parity(engine_dir: Path, manifest: Manifest, comp, images: list,
                         source: str = "images") -> list[Verdict]:
    """Top-1 agreement of each head on each backend with the torch head, on the caller's images."""
    from diffscore.reference.heads import head_logits_reference

    rows = []
    for name in manifest.heads:
        head, config = torch_head(engine_dir, manifest, name)
        want = head_logits_reference(comp, head, config, images).numpy().argmax(1)
        for backend in available_backends(manifest):
            got = load(engine_dir, backend=backend).head_logits(images, name).argmax(1)
            rows.append(agreement(f"{backend} fp32 head {name}", got.tolist(), want.tolist(), "torch fp32", source))
    return rows


def decision_parity(engine_dir: Path, manifest: Manifest, comp, images: list, labels: list[str],
                    source: str = "images", seed: int = 0, progress: bool = False) -> list[Verdict]:
    """Top-1 agreement of each backend/precision with the fp32 torch reference on the caller's images, both
    with the engine's default strategy (the race with its profile, or its stages): what `classify` runs."""
    from diffscore.reference.classifier import classify_reference

    d = manifest.defaults
    opts = dict(templates=[d.template], stages=[tuple(s) for s in d.stages], loss=d.loss, seed=seed)
    race = dict(strategy=d.strategy, race=d.race, profile=manifest.timestep_profile)
    with progress_bar("parity: torch decisions", len(images), progress) as advance:
        want = [r.label for r in classify_reference(comp, images, list(labels), **opts, **race, progress=advance)]
    rows = []
    for backend in available_backends(manifest):
        for precision in PRECISIONS:
            if unet_graph(precision) not in manifest.graphs:
                continue
            if precision == "bf16" and "bf16" not in precisions_on(backend, manifest, "unet"):
                continue
            eng = load(engine_dir, backend=backend, precision=precision)
            got = [r.label for r in eng.classify(images, list(labels), template=opts["templates"][0], loss=opts["loss"],
                                                 seed=seed, progress=progress,
                                                 **({"stages": opts["stages"]} if d.strategy == "stages" else {}))]
            rows.append(agreement(f"{backend} {precision}", got, want, "torch fp32", source))
    return rows


def match_parity(engine_dir: Path, manifest: Manifest, comp, images=None, seed: int = 0) -> list[Verdict]:
    """DSD scores end to end (images x texts) per backend against the torch reference, for engines with a
    trained prompt-learning adapter: covers the merged LoRA and the learned per-layer score weights."""
    from diffscore.reference.matching import match_reference

    trained = manifest.adapters.get("prompt_learning")
    if not trained:
        return []
    images = real_images(manifest, 3, np.random.default_rng(seed), images)
    texts = (trained.captions or [f"a photo of a {w}" for w in ("cat", "dog", "seven")])[:5]
    opts = dict(steps=3, seed=seed)
    want = match_reference(comp, ScoringUNet(comp.unet, manifest.attention_layers), images, texts,
                           layer_weights=trained.score_weights, preset=manifest.defaults.dsd_preset, **opts)
    return [compare(f"{backend} fp32 match (prompt learning)",
                    load(engine_dir, backend=backend).match(images, texts, **opts),
                    want, RTOL["fp32"]) for backend in available_backends(manifest)]


def reference_components(manifest: Manifest, model_dir: str | Path | None = None):
    """The torch model the engine was exported from, with any trained prompt-learning LoRA merged the same way."""
    comp = load_components(model_dir or manifest.source_path)
    trained = manifest.adapters.get("prompt_learning")
    if trained:
        from diffscore.reference.prompt_learning import apply_adapters

        run = apply_adapters(comp, trained.adapters)
        if run["adapter_sha256"] != trained.adapter_sha256:
            raise EngineError(f"{trained.adapters} changed since the engine was exported (sha256 differs); "
                              "re-export with --adapters to compare like with like")
    return comp


def run_parity(engine_dir: str | Path, model_dir: str | Path | None = None, images: list | None = None,
               labels: list[str] | None = None, source: str = "images", echo=print, progress: bool = False) -> bool:
    """Print every verdict and a summary; True when every bound of DESIGN.md §4 holds.

    images: real inputs for the tensor checks and, with `labels`, the decision checks (`source` names
    them in the report); without them the tensor checks use random images and decisions are skipped."""
    engine_dir = Path(engine_dir)
    manifest = Manifest.load(engine_dir)
    comp = reference_components(manifest, model_dir)
    verdicts = (tensor_parity(engine_dir, manifest, comp, images, progress)
                + head_parity(engine_dir, manifest, comp, images=images)
                + match_parity(engine_dir, manifest, comp, images) + itc_parity(engine_dir, manifest, comp, images))
    for v in verdicts:
        echo(str(v))
    decisions = []
    if images and labels:
        decisions = decision_parity(engine_dir, manifest, comp, images, labels, source, progress=progress)
    if images and manifest.heads:
        decisions += head_decision_parity(engine_dir, manifest, comp, images, source)
    decisions += diffdis_parity(engine_dir, manifest, comp, images, labels, source)
    for v in decisions:
        echo(str(v))
    failed = sum(not v.passed for v in verdicts + decisions)
    total = len(verdicts) + len(decisions)
    echo(f"{'PASSED' if not failed else 'FAILED'} | {total - failed}/{total} checks passed")
    return failed == 0


def diffdis_parity(engine_dir: Path, manifest: Manifest, comp, images=None, labels: list[str] | None = None,
                   source: str = "images", seed: int = 0) -> list[Verdict]:
    """DiffDis per backend: its graph on random inputs against the same torch graph, both modes' scores end
    to end (images x texts) against reference.diffdis, and, with labels, top-1 agreement of both modes."""
    if manifest.diffdis is None:
        return []
    from diffscore.engine.scorers.diffdis import MODES, diffdis_spec
    from diffscore.export.diffdis_export import DiffDisGraph
    from diffscore.reference.diffdis import diffdis_scores_reference, image_branch, load_diffdis
    from diffscore.reference.loading import encode_prompts

    spec = manifest.diffdis
    model = load_diffdis(engine_dir, weights=spec.weights, config=spec.config)
    rng = np.random.default_rng(seed)
    contract = diffdis_graph_contract(ModelDims.of(manifest), spec.text_dim)
    feed = contract.sample_feed(2, rng)
    module = DiffDisGraph(image_branch(comp, model), model, encode_prompts(comp, [model.config.prompt])).eval()
    with torch.no_grad():
        want = dict(zip(("error", "similarity"), (o.numpy() for o in module(*(torch.from_numpy(feed[t.name])
                                                                               for t in contract.inputs)))))
    module.unet.remove_hooks()
    pictures = real_images(manifest, 3, rng, images)
    texts = [manifest.defaults.template.format(w) for w in (labels or ("cat", "seven", "three"))][:5]
    modes = MODES
    scores = {m: diffdis_scores_reference(comp, model, pictures, texts, mode=m, seed=seed) for m in modes}
    decisions = {m: diffdis_scores_reference(comp, model, images,
                                             [manifest.defaults.template.format(x) for x in labels],
                                             mode=m, seed=seed).argmax(1) for m in modes} if images and labels else {}
    verdicts = []
    for backend in available_backends(manifest):
        eng = load(engine_dir, backend=backend)
        got = eng.runner(diffdis_spec(eng).graph).infer(feed)
        for name in ("error", "similarity"):
            verdicts.append(compare(f"{backend} fp32 {spec.graph}:{name} (random)", got[name], want[name],
                                    RTOL["fp32"]))
        for m in modes:
            verdicts.append(compare(f"{backend} fp32 diffdis {m} scores (real images, end to end)",
                                    eng.match(pictures, texts, method="diffdis", diffdis_mode=m, seed=seed).scores,
                                    scores[m], RTOL["fp32"]))
            if m in decisions:
                got_labels = [r.label for r in eng.classify(images, list(labels), method="diffdis", diffdis_mode=m,
                                                            seed=seed)]
                verdicts.append(agreement(f"{backend} fp32 diffdis {m}", got_labels,
                                          [labels[i] for i in decisions[m]], "torch fp32", source))
    return verdicts
