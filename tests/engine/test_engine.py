"""The runtime against the torch reference on tiny models, input handling, and the no-torch rule."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import diffscore
from diffscore.engine.images import preprocess
from diffscore.errors import EngineError
from diffscore.reference.classifier import classify_reference
from diffscore.reference.loading import load_components
from diffscore.reference.matching import match_reference
from diffscore.reference.scoring_unet import ScoringUNet

LABELS = ["cat", "dog", "bird", "car"]






@pytest.mark.parametrize("kind", ["sd1", "pixel"])
def test_classify_equals_reference(engines, tiny_models, kind, images_for):
    comp = load_components(tiny_models[kind])
    imgs = images_for(comp, 5)
    opts = dict(stages=[(6, 2), (12, 1)], loss="l1", seed=3)
    got = diffscore.load(engines[kind], backend="ort-cpu").classify(imgs, LABELS, template="a {}", batch_size=7, **opts)
    want = classify_reference(comp, imgs, LABELS, templates=["a {}"], **opts)
    for g, w in zip(got, want):
        assert g.label == w.label and g.passes == w.passes and g.evaluated == w.evaluated
        for (lg, sg), (lw, sw) in zip(g.ranking, w.ranking):
            assert lg == lw and sg == pytest.approx(sw, rel=1e-4)


@pytest.mark.parametrize("bias_weight", [0.0, 0.5])
def test_match_equals_reference(engines, tiny_models, bias_weight, images_for):
    comp = load_components(tiny_models["sd1"])
    eng = diffscore.load(engines["sd1"], backend="ort-cpu")
    imgs = images_for(comp, 3, seed=1)
    got = eng.match(imgs, LABELS, steps=4, bias_weight=bias_weight, seed=2, batch_size=5)
    su = ScoringUNet(comp.unet, eng.manifest.attention_layers)
    want = match_reference(comp, su, imgs, LABELS, steps=4, bias_weight=bias_weight, seed=2)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_batching_and_windows_do_not_change_results(engines, tiny_models, images_for):
    eng = diffscore.load(engines["pixel"], backend="ort-cpu")
    imgs = images_for(load_components(tiny_models["pixel"]), 3)
    a = eng.classify(imgs, LABELS, stages=[(4, 2), (8, 1)], batch_size=3)
    b = [eng.classify([im], LABELS, stages=[(4, 2), (8, 1)], batch_size=64)[0] for im in imgs]
    for x, y in zip(a, b):
        assert [l for l, _ in x.ranking] == [l for l, _ in y.ranking]
        np.testing.assert_allclose([s for _, s in x.ranking], [s for _, s in y.ranking], rtol=1e-5)


def test_text_embeddings_are_cached(engines):
    eng = diffscore.load(engines["pixel"], backend="ort-cpu")
    calls = []
    runner = eng.runners["text_encoder"]
    original = runner.infer
    runner.infer = lambda feed: calls.append(len(feed["input_ids"])) or original(feed)
    eng.encode_text(["a", "b"])
    eng.encode_text(["b", "a", "c"])
    assert calls == [2, 1]


def test_text_is_encoded_in_backend_sized_chunks(engines):
    """A TensorRT plan takes at most max_batch prompts: encoding chunks by the backend's batch."""
    prompts = [f"prompt {i}" for i in range(5)]
    whole = diffscore.load(engines["pixel"], backend="ort-cpu").encode_text(prompts)
    eng = diffscore.load(engines["pixel"], backend="ort-cpu")
    eng.default_batch_size = lambda: 2
    calls, original = [], eng.runners["text_encoder"].infer
    eng.runners["text_encoder"].infer = lambda feed: calls.append(len(feed["input_ids"])) or original(feed)
    np.testing.assert_allclose(eng.encode_text(prompts), whole, rtol=1e-6)
    assert calls == [2, 2, 1]


def test_preprocessing_matches_an_independent_torch_path(tmp_path):
    """Resize (bicubic) + centre crop + [-1, 1]: Pillow path vs torch on an image needing no resize,
    and shape/range checks on one needing both resize and crop."""
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    want = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    np.testing.assert_array_equal(preprocess(arr, 16, 3), want.numpy())
    Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    x = preprocess(tmp_path / "wide.png", 16, 3)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert preprocess(tmp_path / "wide.png", 16, 1).shape == (1, 16, 16)


@pytest.mark.parametrize("call,message", [
    (lambda e: e.classify([np.zeros((8, 8), np.uint8)], []), "non-empty"),
    (lambda e: e.classify(["/nonexistent.png"], ["a"]), "does not exist"),
    (lambda e: e.classify([np.zeros((8, 8), np.float32)], ["a"]), "uint8"),
    (lambda e: e.classify([np.zeros((8, 8), np.uint8)], ["a", "a"]), "duplicates"),
    (lambda e: e.classify([np.zeros((8, 8), np.uint8)], ["a"], loss="l3"), "unknown loss"),
    (lambda e: e.classify([np.zeros((8, 8), np.uint8)], ["a"], stages=[(5, 2), (9, 3)]), "must not increase"),
    (lambda e: e.classify([], ["a"]), "no images"),
])
def test_user_mistakes_are_clear_errors(engines, call, message):
    eng = diffscore.load(engines["pixel"], backend="ort-cpu")
    with pytest.raises(EngineError, match=message):
        call(eng)


def test_load_errors(engines, tmp_path):
    with pytest.raises(EngineError, match="unknown backend"):
        diffscore.load(engines["pixel"], backend="cuda-magic")
    with pytest.raises(EngineError, match="no fp16 UNet"):
        diffscore.load(engines["pixel"], precision="fp16")
    with pytest.raises(EngineError, match="not a diffscore engine"):
        diffscore.load(tmp_path)
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        diffscore.load(engines["pixel"], backend="tensorrt")


def test_runtime_never_imports_torch(engines, tmp_path):
    """Classify and match in a subprocess where `import torch` (and diffusers, transformers) fails."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'diffusers', 'transformers'):
                    raise ImportError('torch is blocked in this test: ' + name)
        sys.meta_path.insert(0, Block())
        import numpy as np, diffscore
        eng = diffscore.load({str(engines['sd1'])!r}, backend='ort-cpu')
        img = np.zeros((16, 16, 3), np.uint8)
        r = eng.classify([img], ['cat', 'dog'], stages=[(2, 1)])
        s = eng.match([img], ['cat', 'dog'], steps=2, bias_weight=1.0)
        from diffscore.app import cli, demo
        assert 'torch' not in sys.modules
        print('ok', r[0].label, s.shape)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok")
