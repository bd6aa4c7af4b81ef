"""torch -> ONNX engine directory (DESIGN.md §2): text encoder, VAE encoder, scoring UNet,
tokenizer.json and manifest.json, written atomically.

Exporter: the TorchScript-based ``torch.onnx.export(dynamo=False)``. Measured on the tiny SD 2.x-style
and pixel UNets (torch 2.13): it exports in 3-5 s with relative error ≤ 1.1e-6 on ε̂, attention
scores and features; the dynamo exporter fails on the ScoringUNet (KeyError on the captured score:
torch.export re-traces the module, so the outputs our attention processors record are not seen).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from diffscore import __version__
from diffscore.errors import EngineError
from diffscore.engine.manifest import (AdapterSpec, GraphSpec, HeadSpec, Manifest, ScoringDefaults, folder_sha256,
                                       sha256_files)
from diffscore.engine.progress import progress_bar
from diffscore.engine.eps_graph import eps_graph
from diffscore.export.atomic import build_dir, check_replaceable
from diffscore.export.eps_graph import write_eps_graph
from diffscore.export.graphs import graph_contracts, head_contract, text_hidden_size
from diffscore.kernels.dsd import DEFAULT_DSD_PRESET, DSD_PRESETS
from diffscore.reference.heads import CONFIG as HEAD_CONFIG, WEIGHTS as HEAD_WEIGHTS
from diffscore.reference.clip_finetune import is_clip_run
from diffscore.reference.finetune import is_finetune_run, load_run_heads
from diffscore.reference.loading import Components, load_components
from diffscore.reference.scoring_unet import ScoringUNet, preset_attention_layers

log = logging.getLogger("diffscore")
OPSET = 18  # 17-19 are all parsed by TensorRT 10/11; 18 has ReduceLogSumExp with axes as input
PROTOBUF_LIMIT = 2**31 - 1  # a single .onnx file cannot exceed 2 GB: larger graphs use external data


def export_engine(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    precisions: tuple[str, ...] = ("fp32",),
    attention_layers: list[str] | None = None,
    feature_blocks: list[str] = (),
    heads: list[str | Path] = (),
    defaults: dict | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    adapters: str | Path | None = None,
    dsd_preset: str | None = None,
    diffdis: str | Path | None = None,
) -> Path:
    """Write an engine directory; nothing is left half-written if anything fails.

    heads: folders made by `diffscore train-head` on this model; each ships as one graph
    `head.<folder name>.onnx` holding the UNet layers it reads and the head (+ its weights and config).
    ``adapters``: a `diffscore train-prompts` run directory whose LoRA is merged into the UNet weights
    right after loading, so the exported graph is a plain UNet and the runtime needs no change; a
    `diffscore finetune` run merges the same way and adds its ITC graphs (export/itc.py, manifest.itc).
    ``dsd_preset`` (kernels.dsd; default: the adapters' preset, else DEFAULT_DSD_PRESET) picks the attention
    layers (unless given) and `Engine.match`'s scoring; the manifest records it.
    ``diffdis``: a `diffscore train-diffdis` run on this model, shipped as one graph `diffdis.onnx`
    (export/diffdis_export.py) and recorded as ``manifest.diffdis``.
    """
    out_dir = Path(out_dir)
    if dsd_preset is not None and dsd_preset not in DSD_PRESETS:
        raise EngineError(f"unknown DSD preset {dsd_preset!r}; choose from {', '.join(DSD_PRESETS)}")
    unknown = set(precisions) - {"fp32", "fp16"}
    if unknown:
        raise EngineError(f"unknown precision {sorted(unknown)}; choose from fp32, fp16 (int8: `diffscore calibrate`)")
    check_replaceable(out_dir, overwrite)
    if heads and adapters is not None:  # a LoRA changes the block features a head was trained on
        raise EngineError("heads are trained on the plain model's features: export them without --adapters "
                          "(or into a separate engine)")
    source_sha256 = folder_sha256(Path(model_dir))
    trained = load_trained_heads(heads, source_sha256)
    comp = load_components(model_dir)
    merged, itc_graphs, itc = {}, {}, None
    if adapters is not None:
        from diffscore.reference.prompt_learning import apply_adapters

        run = apply_adapters(comp, adapters)
        if is_clip_run(adapters):  # a `finetune --clip` run: its CLIP towers ship as the ITC graphs
            from diffscore.export.clip_itc import clip_itc_contracts

            itc_graphs, itc = clip_itc_contracts(run, Path(adapters))
        elif is_finetune_run(adapters):  # a `diffscore finetune` run: its ITC heads ship as two graphs
            from diffscore.export.itc import itc_contracts

            itc_graphs, itc = itc_contracts(comp, load_run_heads(adapters), run, Path(adapters))
        merged["prompt_learning"] = AdapterSpec(
            adapters=str(Path(adapters).resolve()), lora_rank=run["lora"]["rank"], adapter_sha256=run["adapter_sha256"],
            score_weights=run.get("score_weights"), config=run.get("config", {}), captions=run.get("captions", []))
        trained_layers = run["config"]["attention_layers"]
        if run.get("score_weights") and attention_layers and list(attention_layers) != trained_layers:
            raise EngineError(f"{adapters} learned score weights for the layers {trained_layers}; export with those "
                              "attention layers (leave --attention-layers out)")
        attention_layers = attention_layers or trained_layers  # the layers it was trained on
        trained_preset = run["config"].get("preset", "diffscore")
        if dsd_preset not in (None, trained_preset):
            raise EngineError(f"{adapters} was trained with the {trained_preset} DSD preset; export it with that one")
        dsd_preset = trained_preset
    dsd_preset = dsd_preset or DEFAULT_DSD_PRESET
    if attention_layers is None:
        attention_layers = preset_attention_layers(comp.unet, dsd_preset)
    scoring_unet = ScoringUNet(comp.unet, attention_layers, list(feature_blocks)).eval()
    contracts = graph_contracts(comp, scoring_unet)
    for name, (head, config, _) in trained.items():
        contracts[f"head.{name}"] = head_contract(comp, head, config)
    diffdis_model = None
    if diffdis is not None:
        from diffscore.export.diffdis_export import GRAPH as DIFFDIS_GRAPH, diffdis_contract, load_run

        if adapters is not None:  # a LoRA changes the block features the text stream was trained on
            raise EngineError("DiffDis is trained on the plain model's features: export it without --adapters")
        diffdis_model = load_run(comp, diffdis, source_sha256)
        contracts[DIFFDIS_GRAPH] = diffdis_contract(comp, diffdis_model)
    contracts.update(itc_graphs)
    with build_dir(out_dir, overwrite) as tmp:
        steps = len(contracts) + 3 + 2 * ("fp16" in precisions)
        with progress_bar(f"export {out_dir.name}", steps, show_progress) as advance:
            graphs = {}
            for name, (module, sample, inputs, outputs) in contracts.items():
                graphs[name] = export_graph(module, sample, inputs, outputs, tmp, name)
                advance()
            graphs[eps_graph("fp32")] = write_eps_graph(tmp, graphs["unet"], "fp32")  # ε̂-only methods run it
            advance()
            if "fp16" in precisions:
                from diffscore.export.fp16 import convert_unet_fp16

                graphs["unet.fp16"] = convert_unet_fp16(tmp, graphs["unet"])
                advance()
                graphs[eps_graph("fp16")] = write_eps_graph(tmp, graphs["unet.fp16"], "fp16")
                advance()
            write_tokenizer(comp, tmp / "tokenizer.json")
            if comp.tokenizer_2 is not None:
                write_tokenizer(comp, tmp / "tokenizer_2.json", comp.tokenizer_2)
            if itc is not None and itc.kind == "clip":
                from diffscore.export.clip_itc import write_clip_tokenizer

                write_clip_tokenizer(Path(adapters), tmp / itc.tokenizer, itc.max_length)
            for name, (_, config, head_dir) in trained.items():  # weights + config: parity rebuilds the torch head
                shutil.copyfile(head_dir / HEAD_WEIGHTS, tmp / f"head.{name}.safetensors")
                shutil.copyfile(head_dir / HEAD_CONFIG, tmp / f"head.{name}.json")
            diffdis_spec = None
            if diffdis_model is not None:
                from diffscore.export.diffdis_export import ship_run

                diffdis_spec = ship_run(diffdis, tmp, diffdis_model)
            advance()
            manifest = Manifest(
                diffscore_version=__version__,
                source_path=str(Path(model_dir).resolve()),
                source_sha256=source_sha256,
                image_size=comp.image_size,
                image_channels=comp.image_channels,
                latent_scaling=comp.latent_scaling,
                sample_shape=list(contracts["unet"][2][0].shape[1:]),
                alphas_cumprod=comp.alphas_cumprod.tolist(),
                tokenizer="tokenizer.json",
                max_length=int(comp.tokenizer.model_max_length),
                text_hidden_size=text_hidden_size(comp),
                attention_layers=scoring_unet.attention_layers,
                feature_blocks=scoring_unet.feature_blocks,
                graphs=graphs,
                heads={name: head_entry(name, config) for name, (_, config, _) in trained.items()},
                defaults=ScoringDefaults(**{"dsd_preset": dsd_preset, "dsd_steps": DSD_PRESETS[dsd_preset].steps,
                                            **(defaults or {})}),
                adapters=merged,
                prediction_type=comp.prediction_type,
                diffdis=diffdis_spec,
                itc=itc,
                conditioning=comp.conditioning,
                tokenizer_2=None if comp.tokenizer_2 is None else "tokenizer_2.json",
                time_ids=comp.time_ids,
            )
            graph_files = {f for g in manifest.graphs.values() for f in g.files}
            for name in manifest.all_files():  # every non-graph file the manifest names, hashed
                if name not in graph_files:
                    manifest.record_file(tmp, name)
            manifest.save(tmp)
            advance()
    log.info("exported %s -> %s (%s)", model_dir, out_dir, ", ".join(graphs))
    return out_dir


def load_trained_heads(head_dirs, source_sha256: str) -> dict:
    """{name: (module, HeadConfig, folder)}; a head is named after its folder and must fit this model."""
    from diffscore.reference.heads import load_head

    trained = {}
    for head_dir in map(Path, head_dirs):
        name = head_dir.name
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise EngineError(f"head folder name {name!r} is used as the head's name: use letters, digits, - and _")
        if name in trained:
            raise EngineError(f"two heads are named {name!r}; give their folders different names")
        head, config = load_head(head_dir)
        if config.source_sha256 and config.source_sha256 != source_sha256:
            raise EngineError(f"head {head_dir} was trained on another model (sha256 {config.source_sha256[:12]}, "
                              f"this one {source_sha256[:12]}); retrain it with `diffscore train-head`")
        trained[name] = (head, config, head_dir)
    return trained


def head_entry(name: str, config) -> HeadSpec:
    """What the runtime needs to run a head, for manifest.heads."""
    f = config.features
    return HeadSpec(graph=f"head.{name}", kind=config.kind, labels=list(config.labels), blocks=list(f.blocks),
                    steps=list(f.steps), seed=f.seed, prompt=f.prompt, weights=f"head.{name}.safetensors",
                    config=f"head.{name}.json", training=config.origin,
                    feedback=[list(p) for p in config.feedback.pairs] if config.feedback else [])


def export_graph(module, sample, inputs, outputs, out_dir: Path, name: str) -> GraphSpec:
    """Export one module; re-save with one external-data file when the graph exceeds 2 GB."""
    scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=out_dir))
    try:
        # BATCH, ...
        axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in inputs + outputs}
        # diffusers' trace-time branches (a .contiguous() for batch >= 64, a > 2**31-element guard)
        # do not change the math for real shapes: their TracerWarnings are noise to a user.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)  # "Constant folding not applied" for strided Slice
            torch.onnx.export(
                module, sample, str(scratch / "graph.onnx"), dynamo=False, opset_version=OPSET,
                input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                dynamic_axes=axes, do_constant_folding=True,
            )
        model = onnx.load(str(scratch / "graph.onnx"))  # pulls in any per-tensor external files
        return save_graph(model, out_dir, f"{name}.onnx", inputs, outputs, precision="fp32")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_onnx(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save a graph, its weights as external data in one `<name>.data` above 2 GB; returns the data files."""
    # ModelProto.ByteSize() itself fails past 2 GB, so size the weights one tensor at a time
    large = sum(t.ByteSize() for t in model.graph.initializer) > PROTOBUF_LIMIT - (64 << 20)
    data_files = [f"{Path(path).name}.data"] if large else []
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=data_files[0] if large else None)
    return data_files


def save_graph(model: onnx.ModelProto, out_dir: Path, file: str, inputs, outputs, precision: str) -> GraphSpec:
    """Save (external data above 2 GB, in one `<file>.data`) and describe the graph for the manifest."""
    data_files = write_onnx(model, out_dir / file)
    paths = [out_dir / f for f in [file, *data_files]]
    return GraphSpec(file=file, sha256=sha256_files(paths), size=sum(p.stat().st_size for p in paths),
                     precision=precision, inputs=list(inputs), outputs=list(outputs), data_files=data_files)


def write_tokenizer(comp: Components, path: Path, tokenizer=None) -> None:
    """tokenizer.json for the `tokenizers` library, with padding/truncation to max length baked in
    (`tokenizer`: another of the model's tokenizers, e.g. SDXL's tokenizer_2, which pads with its own token)."""
    tok = tokenizer or comp.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise EngineError(f"the tokenizer of {comp.path} has no fast (tokenizers) backend to export")
    backend = backend.__class__.from_str(backend.to_str())  # a copy: leave the loaded tokenizer alone
    L = int(tok.model_max_length)
    backend.enable_truncation(max_length=L)
    backend.enable_padding(length=L, pad_id=int(tok.pad_token_id), pad_token=str(tok.pad_token))
    backend.save(str(path))
