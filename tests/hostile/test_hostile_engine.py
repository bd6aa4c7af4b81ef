"""Untrusted engines and API misuse: every tampered engine directory and every misuse of the Python API is one
line (exit 1 from the CLI, an EngineError from the API), never a traceback, never a NaN result, and nothing is
written outside the engine directory and the cache root.

Each case copies ONE exported tiny engine (the session's `engines["sd1"]`: text encoder, VAE, UNet) and
tampers with the copy: its manifest (types, ranges, digests, shapes, enumerations, schedules, nesting) or its
files (missing, truncated, swapped, symlinked, a tokenizer that disagrees with the graphs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import diffscore
from diffscore.errors import EngineError

NAN = float("nan")
UNET = ("graphs", "unet")


# --- tampering helpers: each takes the manifest dict (and the engine dir) and changes it in place -------------
def put(*path_and_value):
    """put("graphs", "unet", "sha256", value): set one field."""
    *path, key, value = path_and_value

    def edit(m, _):
        for p in path:
            m = m[p]
        m[key] = value
    return edit


def drop(*path):
    def edit(m, _):
        *parents, key = path
        for p in parents:
            m = m[p]
        del m[key]
    return edit


def tensor(graph, what, index, field, value):
    def edit(m, _):
        m["graphs"][graph][what][index][field] = value
    return edit


def rewrite_file(name, change):
    """Rewrite a file of the engine with change(bytes) -> bytes and record its new size (a forger would)."""
    def edit(m, d):
        data = change((d / name).read_bytes())
        (d / name).write_bytes(data)
        for g in m["graphs"].values():
            if g["file"] == name:
                g["size"] = len(data)
        if name in m["files"]:
            m["files"][name]["size"] = len(data)
    return edit


def swap_graph(name, other):
    """Put another graph's file under `name`, with the manifest's size updated to match."""
    return rewrite_file(name, lambda _data, other=other: _engine_bytes[other])


def symlink(name, target):
    def edit(m, d):
        (d / name).unlink()
        os.symlink(target if target != "self" else d / name, d / name)
    return edit


def tokenizer(change):
    """Edit tokenizer.json (a dict) and keep the manifest's size for it."""
    return rewrite_file("tokenizer.json", lambda data: json.dumps(change(json.loads(data))).encode())


def both(*edits):
    def edit(m, d):
        for e in edits:
            e(m, d)
    return edit


def set_tokenizer(path, value):
    def change(t):
        node = t
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value
        return t
    return change


_engine_bytes: dict[str, bytes] = {}  # the pristine engine's graph files, for swap_graph

HEAD = {"graph": "unet", "kind": "linear", "labels": ["a", "b"], "blocks": ["mid_block"], "steps": [50], "seed": 0,
        "prompt": "", "weights": "w", "config": "c"}  # a head record, valid but for what each case changes
DIFFDIS = {"graph": "unet", "blocks": ["mid_block"], "image_step": 1, "seed": 0, "eos_token_id": 1, "text_dim": 4,
           "timesteps": 5, "generate_steps": 2, "mode": "denoise", "weights": "w", "config": "c"}

# (id, edit, a phrase the one-line message holds)
MANIFEST_CASES = [
    # digests, sizes, files
    ("sha256-traversal", put(*UNET, "sha256", "../../x"), "sha256"),
    ("sha256-absolute", put(*UNET, "sha256", "/tmp/dshostile/"), "sha256"),
    ("sha256-short", put(*UNET, "sha256", "abc"), "sha256"),
    ("sha256-uppercase", put(*UNET, "sha256", "A" * 64), "sha256"),
    ("sha256-int", put(*UNET, "sha256", 123), "a string"),
    ("file-sha256-bad", put("files", "tokenizer.json", "sha256", "zz"), "sha256"),
    ("source-sha256-bad", put("source_sha256", "../x"), "source_sha256"),
    ("size-negative", put(*UNET, "size", -1), "size"),
    ("size-string", put(*UNET, "size", "big"), "an integer"),
    ("size-bool", put(*UNET, "size", True), "an integer"),
    ("size-wrong", put(*UNET, "size", 7), "bytes, the manifest says 7"),
    ("graph-file-outside", put(*UNET, "file", "../outside.onnx"), "not inside the engine directory"),
    ("graph-file-absolute", put(*UNET, "file", "/etc/hostname"), "not inside the engine directory"),
    ("graph-file-list", put(*UNET, "file", ["unet.onnx"]), "a string"),
    ("tokenizer-outside", put("tokenizer", "../../etc/passwd"), "not inside the engine directory"),
    ("no-text-encoder", drop("graphs", "text_encoder"), "no text_encoder graph"),
    ("no-unet", drop("graphs", "unet"), "no unet graph"),
    ("graphs-list", put("graphs", []), "does not fit"),
    ("graphs-empty", put("graphs", {}), "graphs"),
    ("graph-key-path", lambda m, _: m["graphs"].update({"../x": m["graphs"]["unet"]}), "graphs"),
    # precisions, dtypes, shapes
    ("precision-fp8", put(*UNET, "precision", "fp8"), "precision"),
    ("dtype-complex", tensor("unet", "inputs", 0, "dtype", "complex128"), "dtype"),
    ("dtype-int", tensor("unet", "inputs", 0, "dtype", 5), "a string"),
    ("dim-zero", tensor("unet", "inputs", 0, "shape", ["batch", 0, 8, 8]), "shape"),
    ("dim-negative", tensor("unet", "inputs", 0, "shape", ["batch", -4, 8, 8]), "shape"),
    ("dim-huge", tensor("unet", "inputs", 0, "shape", ["batch", 4, 2**40, 8]), "shape"),
    ("shape-string", tensor("unet", "inputs", 0, "shape", "batch"), "a list"),
    ("shape-rank-9", tensor("unet", "inputs", 0, "shape", ["batch"] + [1] * 8), "shape"),
    ("input-renamed", tensor("unet", "inputs", 0, "name", "x"), "sample"),
    ("output-renamed", tensor("unet", "outputs", 0, "name", "noise"), "eps"),
    ("attn-scores-width", lambda m, _: m["attention_layers"].pop(), "attn_scores"),
    ("tensor-extra-field", tensor("unet", "inputs", 0, "extra", 1), "does not fit"),
    ("inputs-not-list", put(*UNET, "inputs", 5), "does not fit"),
    # the manifest's own sizes against each other and against the graphs
    ("image-size-zero", put("image_size", 0), "image_size"),
    ("image-size-huge", put("image_size", 10**9), "image_size"),
    ("image-size-string", put("image_size", "16"), "an integer"),
    ("image-size-vs-graph", put("image_size", 32), "image"),
    ("image-size-vs-graph-file", both(put("image_size", 32),
                                      tensor("vae_encoder", "inputs", 0, "shape", ["batch", 3, 32, 32])), "shape"),
    ("channels-2", put("image_channels", 2), "image_channels"),
    ("channels-1-vs-vae", put("image_channels", 1), "image"),
    ("max-length-zero", put("max_length", 0), "max_length"),
    ("max-length-vs-graph", put("max_length", 77), "input_ids"),
    ("hidden-size-vs-graph", put("text_hidden_size", 768), "last_hidden_state"),
    ("sample-shape-2d", put("sample_shape", [4, 8]), "sample_shape"),
    ("sample-shape-zero", put("sample_shape", [4, 0, 8]), "sample_shape"),
    ("latent-scaling-null", put("latent_scaling", None), "latent_scaling"),
    ("latent-scaling-negative", put("latent_scaling", -1.0), "latent_scaling"),
    ("latent-scaling-nan", put("latent_scaling", NAN), "finite"),
    # the schedule
    ("alphas-all-nan", lambda m, _: m.update(alphas_cumprod=[NAN] * len(m["alphas_cumprod"])), "finite"),
    ("alphas-inf", lambda m, _: m["alphas_cumprod"].__setitem__(3, float("inf")), "finite"),
    ("alphas-one", lambda m, _: m["alphas_cumprod"].__setitem__(0, 1.0), "(0, 1)"),
    ("alphas-zero", lambda m, _: m["alphas_cumprod"].__setitem__(-1, 0.0), "(0, 1)"),
    ("alphas-negative", lambda m, _: m["alphas_cumprod"].__setitem__(5, -0.5), "(0, 1)"),
    ("alphas-string", lambda m, _: m["alphas_cumprod"].__setitem__(5, "0.5"), "a finite number"),
    ("alphas-one-value", put("alphas_cumprod", [0.5]), "alphas_cumprod"),
    ("alphas-empty", put("alphas_cumprod", []), "alphas_cumprod"),
    ("alphas-object", put("alphas_cumprod", {"a": 1}), "a list"),
    # enumerations and layer lists
    ("prediction-banana", put("prediction_type", "banana"), "prediction_type"),
    ("prediction-null", put("prediction_type", None), "a string"),
    ("conditioning-banana", put("conditioning", "banana"), "conditioning"),
    ("conditioning-sdxl-alone", put("conditioning", "sdxl"), "conditioning"),
    ("layers-path", lambda m, _: m["attention_layers"].__setitem__(0, "../../x"), "attention_layers"),
    ("layers-duplicate", lambda m, _: m["attention_layers"].__setitem__(1, m["attention_layers"][0]), "distinct"),
    ("blocks-string", put("feature_blocks", "mid_block"), "a list"),
    # scoring defaults
    ("loss-l3", put("defaults", "loss", "l3"), "defaults.loss"),
    ("strategy-fastest", put("defaults", "strategy", "fastest"), "defaults.strategy"),
    ("stages-empty", put("defaults", "stages", []), "defaults.stages"),
    ("stages-zero", put("defaults", "stages", [[0, 1]]), "defaults.stages"),
    ("stages-beyond-T", put("defaults", "stages", [[5000, 1]]), "defaults.stages"),
    ("stages-triple", put("defaults", "stages", [[5, 1, 1]]), "defaults.stages"),
    ("template-attribute", put("defaults", "template", "{0.nope}"), "defaults.template"),
    ("template-none", put("defaults", "template", "a photo"), "defaults.template"),
    ("dsd-preset-x", put("defaults", "dsd_preset", "x"), "defaults.dsd_preset"),
    ("dsd-steps-zero", put("defaults", "dsd_steps", 0), "defaults.dsd_steps"),
    ("race-z-negative", put("defaults", "race", "z", -1.0), "defaults.race"),
    ("race-budget-zero", put("defaults", "race", "budget", 0), "defaults.race"),
    ("defaults-list", put("defaults", []), "expected an object"),
    ("profile-beyond-T", put("timestep_profile", [5000]), "timestep_profile"),
    ("profile-repeated", put("timestep_profile", [5, 5]), "timestep_profile"),
    # records that name graphs and layers
    ("head-missing-graph", put("heads", {"h": {**HEAD, "graph": "head.h"}}), "heads"),
    ("diffdis-missing-graph", put("diffdis", {**DIFFDIS, "graph": "nope"}), "diffdis"),
    ("plan-batches", put("plans", {"p": {"file": "p.plan", "graph": "unet", "gpu": "g", "tensorrt_version": "10.0.0",
                                         "precision": "fp16", "min_batch": 8, "opt_batch": 4, "max_batch": 2,
                                         "sha256": "0" * 64, "size": 1}}), "plans"),
    ("score-weights-keys", put("adapters", {"prompt_learning": {"adapters": "run", "lora_rank": 4,
                                                                "adapter_sha256": "0" * 64,
                                                                "score_weights": {"x": 1.0}}}), "score_weights"),
    ("head-labels-repeated", put("heads", {"h": {**HEAD, "labels": ["a", "a"]}}), "labels"),
    ("head-step-beyond-T", put("heads", {"h": {**HEAD, "steps": [1000]}}), "steps"),
    ("diffdis-mode-x", put("diffdis", {**DIFFDIS, "mode": "x"}), "diffdis.mode"),
    ("itc-missing-graph", put("itc", {"image_graph": "itc_image", "text_graph": "itc_text", "noise_step": 50,
                                      "seed": 0, "blocks": ["mid_block"], "dim": 8}), "itc.image_graph"),
    ("calibration-gate-partial", put("calibration", {
        "file": "cal.npz", "sha256": "0" * 64, "size": 1, "samples": 4, "method": "minmax", "seed": 0, "source": "x",
        "labels": ["a", "b"], "template": "{}", "stages": [[2, 1]], "dsd_steps": 2, "graph": "unet",
        "float_layers": [], "auto": False, "gate": {"images": 3}}), "calibration.gate"),
    ("time-ids-on-sd", put("time_ids", [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]), "conditioning"),
    # the document itself
    ("unknown-field", put("surprise", 1), "does not fit"),
    ("missing-field", drop("image_size"), "does not fit"),
    ("format-99", put("format_version", 99), "format"),
    ("format-string", put("format_version", "2"), "format"),
    ("huge-string", put("source_path", "x" * 100_000), "string"),
    # files: missing, damaged, swapped, symlinked, a tokenizer that disagrees with the graphs
    ("graph-deleted", lambda m, d: (d / "unet.onnx").unlink(), "missing"),
    ("graph-truncated", rewrite_file("unet.onnx", lambda b: b[: len(b) // 2]), "onnxruntime cannot load"),
    ("graph-garbage", rewrite_file("unet.onnx", lambda b: b"\x00garbage" * 100), "onnxruntime cannot load"),
    ("graph-swapped", swap_graph("unet.onnx", "text_encoder.onnx"), "not the graph"),
    ("graph-symlink-loop", symlink("unet.onnx", "self"), "symlink loop"),
    ("graph-symlink-outside", symlink("unet.onnx", "/etc/hostname"), "not inside the engine directory"),
    ("graph-is-directory", lambda m, d: ((d / "unet.onnx").unlink(), (d / "unet.onnx").mkdir()), "missing"),
    ("tokenizer-garbage", rewrite_file("tokenizer.json", lambda b: b"{not json"), "not a tokenizer"),
    ("tokenizer-ids-beyond-vocab", tokenizer(set_tokenizer(["padding", "pad_id"], 10**7)), "text_encoder"),
    ("tokenizer-length-vs-graph", tokenizer(lambda t: set_tokenizer(["truncation", "max_length"], 20)(
        set_tokenizer(["padding", "strategy"], {"Fixed": 20})(t))), "text_encoder"),
]

RAW_MANIFESTS = [  # (id, the manifest file's bytes, phrase)
    ("nested-100k", b"[" * 100_000 + b"]" * 100_000, "nests"),
    ("nested-object-100k", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nests"),
    ("json-list", b"[1, 2]", "not an object"),
    ("json-invalid", b"{manifest", "not valid JSON"),
    ("json-empty", b"", "not valid JSON"),
    ("json-latin1", '{"diffscore_version": "café"}'.encode("latin-1"), "not UTF-8"),
    ("json-nan-everywhere", b"NaN", "not an object"),
]


@pytest.fixture(scope="module")
def pristine(engines):
    """The session's exported tiny SD engine (shared: never modified)."""
    src = engines["sd1"]
    _engine_bytes.update({p.name: p.read_bytes() for p in src.glob("*.onnx")})
    return src


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """tmp/engine (a copy to tamper with), tmp/deep/er/cache (the cache root), tmp/cwd (the working directory),
    tmp/img.png; returns a function that lists every path under tmp outside the engine and the cache."""
    (tmp_path / "cwd").mkdir()
    cache = tmp_path / "deep" / "er" / "cache"
    cache.mkdir(parents=True)
    monkeypatch.setenv("DIFFSCORE_CACHE", str(cache))
    monkeypatch.chdir(tmp_path / "cwd")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img.png")

    def outside() -> set[str]:
        return {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                if not (p == cache or cache in p.parents or tmp_path / "engine" in [p, *p.parents])}

    return outside


def tampered(pristine: Path, tmp_path: Path, edit) -> Path:
    engine = shutil.copytree(pristine, tmp_path / "engine")
    manifest = json.loads((engine / "manifest.json").read_text())
    edit(manifest, engine)
    (engine / "manifest.json").write_text(json.dumps(manifest))
    return engine


def assert_one_line(code: int, err: str, phrase: str, exit_code: int = 1) -> None:
    assert code == exit_code and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0], err


def classify(run_cli_out, engine, tmp_path, backend="ort-cpu"):
    return run_cli_out("classify", engine, tmp_path / "img.png", "--labels", "cat,dog", "--stages", "2:1",
                       "--backend", backend, "-f", "json")


@pytest.mark.parametrize("edit,phrase", [c[1:] for c in MANIFEST_CASES], ids=[c[0] for c in MANIFEST_CASES])
def test_tampered_engine_is_one_line(pristine, sandbox, tmp_path, run_cli_out, edit, phrase):
    before = sandbox()
    engine = tampered(pristine, tmp_path, edit)
    code, out, err = classify(run_cli_out, engine, tmp_path)
    assert_one_line(code, err, phrase)
    assert out == "" and sandbox() == before, "nothing printed as a result, nothing written outside"


@pytest.mark.parametrize("raw,phrase", [c[1:] for c in RAW_MANIFESTS], ids=[c[0] for c in RAW_MANIFESTS])
def test_hostile_manifest_documents_are_one_line(pristine, sandbox, tmp_path, run_cli_out, raw, phrase):
    engine = tampered(pristine, tmp_path, lambda m, d: None)
    (engine / "manifest.json").write_bytes(raw)
    before = sandbox()
    code, out, err = classify(run_cli_out, engine, tmp_path)
    assert_one_line(code, err, phrase)
    with pytest.raises(EngineError, match=phrase) as e:
        diffscore.load(engine, backend="ort-cpu")
    assert "\n" not in str(e.value) and sandbox() == before


@pytest.mark.parametrize("name", ["text_encoder", "unet_eps", "vae_encoder"])  # classify's UNet: the ε̂-only graph
def test_graph_failing_while_running_names_the_graph(pristine, sandbox, tmp_path, monkeypatch, run_cli_out, name):
    """An error from ONNX Runtime's session.run (a graph that loads but cannot run these inputs)."""
    from diffscore.engine.backends import onnxruntime as ortb

    real = ortb.OnnxRuntimeRunner._infer

    def failing(self, feed):  # past the feed checks: the session itself gets inputs it cannot run
        return real(self, {k: v[..., :0] if v.ndim > 1 and self.graph == name else v for k, v in feed.items()})

    monkeypatch.setattr(ortb.OnnxRuntimeRunner, "_infer", failing)
    before = sandbox()
    code, out, err = classify(run_cli_out, pristine, tmp_path)
    assert_one_line(code, err, f"{name}: onnxruntime failed to run it")
    assert "damaged" in err and sandbox() == before


@pytest.mark.parametrize("sha", ["../../x", "/tmp/dshostile/", "a" * 63 + "/"])
def test_a_digest_that_is_a_path_writes_nothing(pristine, sandbox, tmp_path, run_cli_out, sha):
    """OpenVINO's compile cache was once named by the manifest's sha256: a digest that is a path is refused at load."""
    pytest.importorskip("openvino")
    before = sandbox()
    engine = tampered(pristine, tmp_path, put(*UNET, "sha256", sha))
    assert_one_line(*classify(run_cli_out, engine, tmp_path, "openvino")[::2], "sha256")
    assert not Path("/tmp/dshostile").exists() and sandbox() == before


def test_openvino_cache_stays_inside_the_cache_root(pristine, sandbox, tmp_path, run_cli_out):
    """A valid engine's compiled models go under the cache root (named by a hash), nowhere else."""
    pytest.importorskip("openvino")
    before = sandbox()
    engine = tampered(pristine, tmp_path, lambda m, d: None)
    code, out, err = classify(run_cli_out, engine, tmp_path, "openvino")
    assert code == 0 and all(np.isfinite(entry[1]) for entry in json.loads(out)[0]["ranking"]), err
    cache = Path(os.environ["DIFFSCORE_CACHE"])
    assert list((cache / "openvino").rglob("*.blob")) and sandbox() == before


def test_sha256_is_checked_on_demand(pristine, sandbox, tmp_path, run_cli_out):
    """A same-size graph with other bytes passes the load checks; `info --verify` names it."""
    before = sandbox()
    engine = tampered(pristine, tmp_path, rewrite_file("unet.onnx", lambda b: b[:-1] + bytes([b[-1] ^ 1])))
    code, out, err = run_cli_out("info", engine, "--verify")
    assert_one_line(code, err, "sha256 mismatch in unet")
    assert sandbox() == before


# --- the Python API ------------------------------------------------------------------------------------------
def closed(engine_dir):
    eng = diffscore.load(engine_dir, backend="ort-cpu")
    eng.close()
    return eng


IMAGE = np.zeros((16, 16, 3), np.uint8)
API_CASES = [
    ("load-none", lambda d: diffscore.load(None), "engine_dir must be"),
    ("load-int", lambda d: diffscore.load(3), "engine_dir must be"),
    ("load-empty", lambda d: diffscore.load(""), "engine_dir must be"),
    ("load-missing", lambda d: diffscore.load(d / "nope"), "does not exist"),
    ("load-file", lambda d: diffscore.load(d / "manifest.json"), "does not exist"),
    ("load-backend", lambda d: diffscore.load(d, backend="cuda9"), "unknown backend"),
    ("load-precision", lambda d: diffscore.load(d, precision="fp8"), "unknown precision"),
    ("load-no-int8", lambda d: diffscore.load(d, backend="ort-cpu", precision="int8"), "no int8 UNet"),
    ("load-threads", lambda d: diffscore.load(d, backend="ort-cpu", threads=0), "threads"),
    ("load-runner-role", lambda d: diffscore.load(d, backend="ort-cpu", runners={"vae": None}), "runner overrides"),
    ("closed-classify", lambda d: closed(d).classify([IMAGE], ["a", "b"]), "closed"),
    ("closed-match", lambda d: closed(d).match([IMAGE], ["a", "b"]), "closed"),
    ("closed-encode-text", lambda d: closed(d).encode_text(["a"]), "closed"),
    ("closed-encode-images", lambda d: closed(d).encode_images([IMAGE]), "closed"),
    ("closed-runner", lambda d: closed(d).runner("unet"), "closed"),
    ("closed-graph-runner", lambda d: closed(d).runner("vae_encoder"), "closed"),
    ("image-5-channels", lambda d: diffscore.load(d, backend="ort-cpu").classify(np.zeros((8, 8, 5), np.uint8),
                                                                                   ["a", "b"]), "array images"),
    ("image-0x0", lambda d: diffscore.load(d, backend="ort-cpu").classify(np.zeros((0, 0), np.uint8), ["a", "b"]),
     "array images"),
    ("image-0-rows", lambda d: diffscore.load(d, backend="ort-cpu").classify([np.zeros((0, 5, 3), np.uint8)],
                                                                               ["a", "b"]), "array images"),
    ("image-float", lambda d: diffscore.load(d, backend="ort-cpu").classify([np.zeros((8, 8), np.float64)],
                                                                              ["a", "b"]), "array images"),
    ("image-4d", lambda d: diffscore.load(d, backend="ort-cpu").classify([np.zeros((2, 8, 8, 3), np.uint8)],
                                                                           ["a", "b"]), "array images"),
    ("image-pil-0x0", lambda d: diffscore.load(d, backend="ort-cpu").classify([Image.new("RGB", (0, 0))],
                                                                                ["a", "b"]),
     "at least one pixel|nothing to score"),
    ("image-object", lambda d: diffscore.load(d, backend="ort-cpu").classify([object()], ["a", "b"]),
     "unsupported image type"),
    ("image-missing-file", lambda d: diffscore.load(d, backend="ort-cpu").classify([d / "no.png"], ["a", "b"]),
     "does not exist"),
    ("image-not-image", lambda d: diffscore.load(d, backend="ort-cpu").classify([d / "manifest.json"], ["a", "b"]),
     "cannot read image"),
    ("match-image-5-channels", lambda d: diffscore.load(d, backend="ort-cpu").match([np.zeros((8, 8, 5), np.uint8)],
                                                                                    ["a", "b"]), "array images"),
]


@pytest.mark.parametrize("call,phrase", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_misuse_is_one_line(pristine, sandbox, call, phrase):
    before = sandbox()
    with pytest.raises(EngineError, match=phrase) as e:
        call(pristine)
    assert "\n" not in str(e.value) and sandbox() == before
