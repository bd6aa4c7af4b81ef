"""Heads on UNet block features: the taps (names, shapes, fixed ε, empty prompt), each head's forward,
pooling equal to adaptive average pooling, seeded deterministic training, save/load, input checks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffscore.engine.images import image_folder
from diffscore.errors import EngineError
from diffscore.kernels import shared_noise
from diffscore.reference.features import FeatureSpec, extract_features, tappable_blocks
from diffscore.reference.head_training import TrainOptions, train_head, validation_split
from diffscore.reference.heads import HeadConfig, Pool, load_head, save_head
from diffscore.reference.loading import encode_prompts, load_components
from diffscore.reference.scoring_unet import ScoringUNet

BLOCKS = ["down_blocks.0", "mid_block", "up_blocks.1"]


@pytest.fixture(scope="module")
def pixel(tiny_models):
    return load_components(tiny_models["pixel"])


def digits(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(n)]


def test_taps_names_and_shapes(pixel):
    assert tappable_blocks(pixel.unet) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    feats = extract_features(pixel, digits(5), FeatureSpec(BLOCKS, [10, 500]), batch_size=4)
    assert list(feats) == BLOCKS
    assert feats["down_blocks.0"].shape == (5, 2, 16, 4, 4)
    assert feats["mid_block"].shape == (5, 2, 32, 4, 4)
    assert feats["up_blocks.1"].shape == (5, 2, 16, 8, 8)


@torch.no_grad()
def test_taps_use_fixed_noise_and_the_empty_prompt(pixel):
    images = digits(3)
    spec = FeatureSpec(["mid_block"], [10, 500], seed=7)
    feats = extract_features(pixel, images, spec)
    x0 = torch.from_numpy(np.stack([np.asarray(im, np.float32)[None] / 127.5 - 1 for im in images]))
    eps = torch.from_numpy(shared_noise(7, 2, (1, 8, 8)))
    su = ScoringUNet(pixel.unet, attention_layers=[], feature_blocks=["mid_block"])
    for k, t in enumerate([10, 500]):  # step k of every image: the same ε_k
        abar = pixel.alphas_cumprod[t]
        x_t = abar.sqrt().float() * x0 + (1 - abar).sqrt().float() * eps[k]
        _, _, want = su(x_t, torch.full((3,), float(t)), encode_prompts(pixel, [""]).expand(3, -1, -1))
        torch.testing.assert_close(feats["mid_block"][:, k], want, rtol=1e-4, atol=1e-5)  # batch shapes differ
    su.remove_hooks()
    other = extract_features(pixel, images, FeatureSpec(["mid_block"], [10, 500], seed=7, prompt="a cat"))
    assert not torch.allclose(other["mid_block"], feats["mid_block"])


@pytest.mark.parametrize("blocks,steps,message", [
    (["middle_block"], [10], "unknown block 'middle_block'"),
    ([], [10], "no feature blocks"),
    (["mid_block"], [1000], "outside [0, 1000)"),
    (["mid_block"], [-1], "outside"),
    (["mid_block"], [], "no noise steps"),
    (["mid_block"], [5, 5], "duplicates"),
])
def test_bad_blocks_and_steps_are_refused(pixel, blocks, steps, message):
    with pytest.raises(EngineError, match=message.replace("[", r"\[").replace(")", r"\)")):
        extract_features(pixel, digits(1), FeatureSpec(blocks, steps))


@pytest.mark.parametrize("n_in,size", [(8, 2), (7, 2), (24, 16), (5, 3), (8, 16)])
def test_pool_is_adaptive_average_pooling(n_in, size):
    x = torch.randn(2, 3, n_in, n_in + 1)
    pool = Pool(n_in, n_in + 1, size)
    torch.testing.assert_close(pool(x), F.adaptive_avg_pool2d(x, pool.out))


SHAPES = [[16, 4, 4], [8, 8, 8]]


def config(kind, blocks=("a", "b"), steps=(10, 50), **kw):
    shapes = SHAPES[: len(blocks)]
    return HeadConfig(kind=kind, labels=["x", "y", "z"], features=FeatureSpec(list(blocks), list(steps)),
                      shapes=shapes, dim=16, heads=2, **kw)


def features(n=4, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, steps, *s, generator=g) for s in SHAPES]


@pytest.mark.parametrize("kind", ["linear", "difformer"])
def test_heads_forward(kind):
    head = config(kind).build()
    assert head(*features()).shape == (4, 3)


def test_attention_head_reads_one_block_at_one_step():
    head = config("attention", blocks=["a"], steps=[10]).build()
    assert head(features(steps=1)[0]).shape == (4, 3)
    with pytest.raises(EngineError, match="one block at one step"):
        config("attention")


def test_difformer_shares_its_transformer_across_steps():
    one, three = config("difformer", steps=[10]).build(), config("difformer", steps=[10, 50, 90]).build()
    n = lambda m: sum(p.numel() for name, p in m.named_parameters() if not name.startswith("fc."))
    assert n(one) == n(three)  # only the final linear grows with the number of steps
    assert three.fc.in_features == 3 * 16
    # and the steps' CLS outputs are concatenated: the head on S steps = fc over each step's CLS
    f = features(steps=3)
    with torch.no_grad():
        cls = []
        for k in range(3):
            h = three
            x = torch.cat([tok(x[:, k]) for tok, x in zip(h.tokens, f)], dim=1)
            x = torch.cat([h.cls.expand(len(x), -1, -1), x], dim=1)
            cls.append(h.norm(h.blocks(x)[:, 0]))
        torch.testing.assert_close(three(*f), three.fc(torch.cat(cls, dim=1)))


def labelled(n=60, seed=0):
    """Three separable classes: the class shifts half the channels of the first block (LayerNorm keeps that)."""
    f = features(n, seed=seed)
    y = torch.arange(n) % 3
    f[0][:, :, :8] += 2 * y.view(-1, 1, 1, 1, 1).float()
    return {"a": f[0], "b": f[1]}, y.numpy()


@pytest.mark.parametrize("kind", ["linear", "difformer"])
def test_training_is_deterministic_and_learns(kind):
    feats, y = labelled()
    opts = TrainOptions(epochs=15, batch_size=16, seed=1)
    runs = []
    for seed in (1, 1, 2):
        cfg = config(kind)
        runs.append((train_head(feats, y, cfg, TrainOptions(**{**opts.__dict__, "seed": seed})), cfg))
    (a, cfg), (b, _), (c, _) = runs
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    t = cfg.training
    assert t["images"] + t["val_images"] == 60 and t["val_images"] == 6
    with torch.no_grad():
        accuracy = (a(feats["a"], feats["b"]).argmax(1).numpy() == y).mean()
    assert accuracy >= 0.9 and t["val_loss"] < 0.7, (accuracy, t)


def test_early_stopping_keeps_the_best_epoch():
    feats, y = labelled()
    cfg = config("difformer")
    train_head(feats, y, cfg, TrainOptions(epochs=200, patience=3, lr=3e-2, batch_size=8))
    t = cfg.training
    assert t["epochs"] < 200 and t["epochs"] - t["best_epoch"] == 3


def test_validation_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(4), [10, 20, 1, 5])
    tr, va = validation_split(y, 0.1, seed=0)
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == len(y)
    assert [int((y[va] == c).sum()) for c in range(4)] == [1, 2, 0, 1]  # a class of one stays in training
    assert len(validation_split(y, 0.0, seed=0)[1]) == 0


def test_save_and_load(tmp_path):
    feats, y = labelled()
    cfg = config("linear")
    head = train_head(feats, y, cfg, TrainOptions(epochs=2))
    save_head(head, cfg, tmp_path / "h")
    loaded, cfg2 = load_head(tmp_path / "h")
    assert cfg2 == cfg
    f = features(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*f), head(*f))
    with pytest.raises(EngineError, match="not a trained head"):
        load_head(tmp_path)


def test_image_folder(tmp_path):
    from PIL import Image

    with pytest.raises(EngineError, match="no class subfolders"):
        image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "cat" / "1.png")
    with pytest.raises(EngineError, match="dog has no images"):
        image_folder(tmp_path)
    Image.new("L", (8, 8)).save(tmp_path / "dog" / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "dog" / "b.jpg")
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    paths, labels, classes = image_folder(tmp_path)
    assert classes == ["cat", "dog"] and labels == [0, 1, 1] and [p.name for p in paths] == ["1.png", "a.png", "b.jpg"]
    with pytest.raises(EngineError, match="does not exist"):
        image_folder(tmp_path / "missing")
