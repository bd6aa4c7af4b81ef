"""DiffDis end to end on a tiny pixel model: export records it (one graph, typed manifest record), the
engine equals the torch reference in both modes (tensors and decisions), the CLI trains, exports and
answers with it, and user mistakes are one line."""

import json

import numpy as np
import pytest
from PIL import Image

import diffscore
from diffscore.app import cli
from diffscore.engine.scorers import diffdis as engine_diffdis
from diffscore.engine.manifest import Manifest
from diffscore.errors import EngineError
from diffscore.export.onnx_export import export_engine
from diffscore.export.parity import available_backends, diffdis_parity
from diffscore.reference import diffdis as reference_diffdis
from diffscore.reference.diffdis import DiffDisTrainOptions, diffdis_scores_reference, load_diffdis, train_diffdis_run
from diffscore.reference.loading import load_components

LABELS = ["cat", "dog", "seven"]


@pytest.fixture(scope="module")
def pixel(tiny_models):
    return tiny_models["pixel"]


@pytest.fixture(scope="module")
def images(pixel, images_for):
    return images_for(load_components(pixel), 8, seed=3)


@pytest.fixture(scope="module")
def diffdis_engine(pixel, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffdis")
    captions = [f"a photo of a {LABELS[i % 3]}" for i in range(len(images))]
    train_diffdis_run(pixel, images, captions, root / "run", options=DiffDisTrainOptions(epochs=2, batch_size=4),
                      progress=False, dim=16, heads=2, timesteps=3, generate_steps=2)
    return export_engine(pixel, root / "engine", diffdis=root / "run", defaults={"template": "a photo of a {}"},
                         show_progress=False)


def test_manifest_records_one_graph(diffdis_engine):
    m = Manifest.load(diffdis_engine)
    spec = m.diffdis
    assert spec.graph == "diffdis" and spec.graph in m.graphs
    assert (spec.blocks == ["down_blocks.1", "mid_block", "up_blocks.1"]
            and spec.timesteps == 3 and spec.generate_steps == 2)
    graph = m.graphs["diffdis"]
    assert [t.name for t in graph.inputs] == ["sample", "text", "noise", "timestep"]
    assert [t.name for t in graph.outputs] == ["error", "similarity"]
    assert {spec.weights, spec.config} <= set(m.files)  # hashed with the engine
    assert not m.verify(diffdis_engine)


def test_engine_equals_torch_reference(diffdis_engine, pixel, images):
    comp = load_components(pixel)
    model = load_diffdis(diffdis_engine)
    texts = ["a photo of a cat", "a photo of a dog", "seven"]
    with diffscore.load(diffdis_engine, backend="ort-cpu") as eng:
        for mode in ("denoise", "generate"):
            got = eng.match(images, texts, method="diffdis", diffdis_mode=mode, seed=5)
            want = diffdis_scores_reference(comp, model, images, texts, mode=mode, seed=5)
            np.testing.assert_allclose(got.scores, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
            assert got.options.method == f"diffdis-{mode}"
            results = eng.classify(images, LABELS, method="diffdis", diffdis_mode=mode, seed=5)
            labels_want = [LABELS[i] for i in diffdis_scores_reference(
                comp, model, images, [f"a photo of a {x}" for x in LABELS], mode=mode, seed=5).argmax(1)]
            assert [r.label for r in results] == labels_want
            assert all(r.passes == 1 and r.options.to_dict()["method"] == f"diffdis-{mode}" for r in results)
        # mode "denoise" by hand: −mean error over the DC grid's timesteps, each candidate on the same ε
        assert eng.match(images[:1], texts, method="diffdis",
                         diffdis_mode="denoise").options.timesteps == (166, 499, 832)


def test_parity_verdicts_pass(diffdis_engine, pixel, images):
    manifest = Manifest.load(diffdis_engine)
    verdicts = diffdis_parity(diffdis_engine, manifest, load_components(pixel), images, LABELS)
    # per backend: the graph's two outputs on random inputs, both modes' scores, both modes' decisions
    assert len(verdicts) == 6 * len(available_backends(manifest)) and all(v.passed for v in verdicts), \
        [str(v) for v in verdicts]


def test_modes_are_one_list():
    assert engine_diffdis.MODES == reference_diffdis.MODES == tuple(m.value for m in cli.DiffDisMode)


def test_one_line_errors(diffdis_engine, engines, images):
    with diffscore.load(engines["pixel"], backend="ort-cpu") as plain:
        with pytest.raises(EngineError, match="no DiffDis model; train one"):
            plain.classify(images[:1], LABELS, method="diffdis")
        with pytest.raises(EngineError, match="unknown match method 'clip'"):
            plain.match(images[:1], ["a"], method="clip")
    with diffscore.load(diffdis_engine, backend="ort-cpu") as eng:
        with pytest.raises(EngineError, match="unknown DiffDis mode 'sample'"):
            eng.match(images[:1], ["a", "b"], method="diffdis", diffdis_mode="sample")
        with pytest.raises(EngineError, match="needs labels"):
            eng.classify(images[:1], None, method="diffdis")
        with pytest.raises(EngineError, match="--timesteps must be in"):
            eng.classify(images[:1], LABELS, method="diffdis", timesteps=5000)


def write_pairs(images, tmp_path):
    """6 images as PNGs + tmp_path/pairs.jsonl captioning them (train-diffdis --data)."""
    rows = []
    for i, img in enumerate(images[:6]):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": f"a photo of a {LABELS[i % 3]}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(rows))


def test_cli_train_export_classify_match(pixel, images, tmp_path, run_cli, run_cli_out):
    write_pairs(images, tmp_path)
    run, engine = tmp_path / "run", tmp_path / "engine"
    code, err = run_cli("train-diffdis", pixel, "--data", tmp_path / "pairs.jsonl", "--out", run, "--epochs", "1")
    assert code == 0, err
    code, err = run_cli("train-diffdis", pixel, "--data", tmp_path / "pairs.jsonl", "--out", run)
    assert code == 1 and "already holds a DiffDis run" in err and len(err.strip().splitlines()) == 1
    assert run_cli("export", pixel, engine, "--diffdis", run)[0] == 0
    code, out, err = run_cli_out("classify", engine, tmp_path / "0.png", "--labels", "cat,dog", "--method", "diffdis",
                                 "--diffdis-mode", "generate", "--format", "json")
    assert code == 0, err
    assert json.loads(out)[0]["options"]["method"] == "diffdis-generate"
    code, out, err = run_cli_out("match", engine, tmp_path / "1.png", "-t", "a cat", "-t", "a "
                                                                                           "dog", "--method", "diffdis",
                                 "--format", "json")
    assert code == 0, err
    assert json.loads(out)[0]["options"]["method"] == "diffdis-denoise"
    for args, message in (((tmp_path / "0.png", "--labels", "a,b", "--diffdis-mode", "generate"), "go with --method "
                                                                                                  "diffdis"),):
        code, err = run_cli("classify", engine, *args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1  # usage mistakes
    code, err = run_cli("train-diffdis", pixel, "--out", tmp_path / "x")
    assert code == 2 and "exactly one of --data" in err


# --- unified DiffDis: the trained UNet ships inside the graph --------------------------------------
@pytest.fixture(scope="module")
def unified_engine(pixel, images, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffdis-unified")
    captions = [f"a photo of a {LABELS[i % 3]}" for i in range(len(images))]
    train_diffdis_run(pixel, images, captions, root / "run", unified=True, progress=False, dim=16, heads=2, timesteps=3,
                      generate_steps=2, options=DiffDisTrainOptions(epochs=2, batch_size=4, unet_lr=1e-3))
    return export_engine(pixel, root / "engine", diffdis=root / "run", defaults={"template": "a photo of a {}"},
                         show_progress=False)


def test_unified_engine_parity(unified_engine, pixel, images):
    """Every block of the UNet is read (all resolutions), the graph carries the trained UNet (not the model's),
    and the engine equals torch in both modes, tensors and decisions."""
    m = Manifest.load(unified_engine)
    assert m.diffdis.blocks == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    model = load_diffdis(unified_engine)
    assert model.config.unified and model.config.fusion == "stages" and model.unet_state
    verdicts = diffdis_parity(unified_engine, m, load_components(pixel), images, LABELS)
    assert len(verdicts) == 6 * len(available_backends(m)) and all(v.passed for v in verdicts), \
        [str(v) for v in verdicts]
    # the graph is the trained UNet's: the frozen model's UNet gives other scores
    comp = load_components(pixel)
    texts = ["a photo of a cat", "a photo of a dog"]
    with diffscore.load(unified_engine, backend="ort-cpu") as eng:
        got = eng.match(images, texts, method="diffdis", diffdis_mode="denoise", seed=1).scores
    want = diffdis_scores_reference(comp, model, images, texts, mode="denoise", seed=1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    model.config.unified = False  # read the frozen UNet instead
    assert np.abs(diffdis_scores_reference(comp, model, images, texts, mode="denoise", seed=1) - want).max() > 1e-4


def test_cli_unified(pixel, images, tmp_path, run_cli, run_cli_out):
    write_pairs(images, tmp_path)
    run, engine = tmp_path / "run", tmp_path / "engine"
    code, err = run_cli("train-diffdis", pixel, "--data", tmp_path / "pairs.jsonl", "--out", run, "--epochs", "1",
                        "--unified", "--generation-weight", "0.5")
    assert code == 0, err
    cfg = json.loads((run / "diffdis.json").read_text())
    assert cfg["unified"] and cfg["fusion"] == "stages" and cfg["training"]["generation_weight"] == 0.5
    assert run_cli("export", pixel, engine, "--diffdis", run)[0] == 0
    code, out, err = run_cli_out("match", engine, tmp_path / "1.png", "-t", "a cat", "-t", "a dog",
                                 "--method", "diffdis",
                                 "--format", "json")
    assert code == 0, err
    for bad, message in ((("--generation-weight", "-1"), "--generation-weight"),
                         (("--text-weight", "0.5"), "--unified")):
        code, err = run_cli("train-diffdis", pixel, "--data", tmp_path / "pairs.jsonl", "--out", tmp_path / "y", *bad)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
