"""Image models (models.vision) and their training: shapes, the document's exact layers, checkpoints, configs, fit learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from models.vision import DocumentMLP, ImageClassifier, ImageModelConfig
from tasks.core.config import TrainConfig
from tasks.vision.loader import ImageSplit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread is faster than two and immune to a busy machine's thread contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["document", "variant", "cnn"])
def test_shapes_and_loss(kind: str) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(ImageModelConfig(kind=kind), (28, 28), 10)
    x = torch.randn(5, 784)
    logits, loss = model(x, torch.tensor([0, 1, 2, 3, 9]))
    assert logits.shape == (5, 10) and loss is not None and loss.ndim == 0
    assert model(x)[1] is None


def test_document_mlp_is_exactly_the_documents() -> None:
    model = ImageClassifier(ImageModelConfig(kind="document"), (28, 28), 10)
    net = model.net
    assert isinstance(net, DocumentMLP)
    assert [(m.in_features, m.out_features) for m in (net.fc1, net.fc2, net.fc3)] == [(784, 256), (256, 128), (128, 10)]
    assert net.dropout.p == 0.5 and model.num_parameters() == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    # ReLU after the first layer only: in eval mode fc3(fc2(h)) is linear in h
    net.eval()
    head = lambda h: net.fc3(net.fc2(h))
    a, b = torch.randn(3, 256), torch.randn(3, 256)
    assert torch.allclose(head(a + b) - head(b), head(a) - head(torch.zeros(3, 256)), atol=1e-5)  # affine
    x = torch.randn(4, 784)
    expected = net.fc3(net.fc2(torch.relu(net.fc1(x))))
    assert torch.allclose(net(x), expected)
    variant = ImageClassifier(ImageModelConfig(kind="variant"), (28, 28), 10).eval()
    layers = variant.net.hidden
    assert torch.allclose(variant(x)[0], variant.net.out(torch.relu(layers[1](torch.relu(layers[0](x))))))


def test_checkpoint_round_trip() -> None:
    torch.manual_seed(1)
    model = ImageClassifier(ImageModelConfig(kind="cnn", channels=[4, 8], hidden=[16]), (28, 28), 10,
                            label_smoothing=0.1).eval()
    ckpt = model.checkpoint(labels=list("0123456789"))
    copy = ImageClassifier.from_checkpoint(ckpt).eval()
    x = torch.randn(2, 784)
    assert torch.equal(model(x)[0], copy(x)[0]) and copy.label_smoothing == 0.1
    del ckpt["label_smoothing"]  # checkpoints written before label smoothing existed
    assert ImageClassifier.from_checkpoint(ckpt).label_smoothing == 0.0


def test_label_smoothing_reaches_the_loss() -> None:
    torch.manual_seed(0)
    plain = ImageClassifier(ImageModelConfig(kind="variant", hidden=[8]), (4, 4), 3).eval()
    smooth = ImageClassifier(ImageModelConfig(kind="variant", hidden=[8]), (4, 4), 3, label_smoothing=0.2).eval()
    smooth.load_state_dict(plain.state_dict())
    x, y = torch.randn(5, 16), torch.tensor([0, 1, 2, 0, 1])
    logits, a = plain(x, y)
    b = smooth(x, y)[1]
    assert torch.allclose(a, torch.nn.functional.cross_entropy(logits, y))
    assert torch.allclose(b, torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.2)) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="label_smoothing"):
        ImageClassifier(ImageModelConfig(), (4, 4), 3, label_smoothing=1.0)


# The tests below go through tasks/ (recipes, the training loop); imported inside each test so that the
# model tests above never depend on the pipeline's module layout.


def test_config_routes_by_task() -> None:
    from tasks.core.config import RecipeError
    from tasks.registry import load_recipe, recipe_from_dict

    mnist = load_recipe(ROOT / "configs" / "mnist.yaml")
    assert isinstance(mnist.model, ImageModelConfig)
    document = load_recipe(ROOT / "configs" / "mnist.yaml", ["model.kind=document"])
    assert document.model.kind == "document" and document.model.hidden == [256, 128]
    minimal = recipe_from_dict({"name": "m", "task": "image-classification", "data": {"train_path": "x"}})
    assert isinstance(minimal.model, ImageModelConfig)
    with pytest.raises(RecipeError, match=r"model.kind: Extra inputs are not permitted"):
        recipe_from_dict({"name": "t", "data": {"train_path": "x.csv"}, "model": {"kind": "variant"}})
    with pytest.raises(RecipeError, match=r"model.d_model: Extra inputs are not permitted"):
        load_recipe(ROOT / "configs" / "mnist.yaml", ["model.d_model=64"])
    with pytest.raises(RecipeError, match=r"model.hidden: the document's MLP has exactly two hidden layers"):
        load_recipe(ROOT / "configs" / "mnist.yaml", ["model.kind=document", "model.hidden=[10]"])
    with pytest.raises(RecipeError, match=r"data.format: Input should be 'idx'"):
        load_recipe(ROOT / "configs" / "mnist.yaml", ["data.format=csv"])


def blobs(n: int, seed: int) -> ImageSplit:
    """Two classes of 4x4 images: bright left half or bright right half, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    pixels = rng.integers(0, 60, (n, 4, 4))
    for i, y in enumerate(labels):
        pixels[i, :, 2 * y : 2 * y + 2] += 180
    return ImageSplit(pixels.reshape(n, 16).astype(np.uint8), labels.astype(np.int64))


def tiny_cfg(optimizer: str = "adam", epochs: int = 3) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, optimizer=optimizer, schedule="constant", warmup_fraction=0,
                       grad_clip=None, weight_decay=0, device="cpu", patience=epochs)


def document(seed: int = 0) -> ImageClassifier:
    from tasks.vision.train import build_model

    return build_model(ImageModelConfig(kind="document", hidden=[16, 8]), (4, 4), 2, seed=seed)


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_fit_learns_and_is_deterministic(optimizer: str) -> None:
    from tasks.vision.train import fit, predict_proba

    train, validation = blobs(400, 0), blobs(100, 1)
    runs = []
    for _ in range(2):
        model = document()
        result = fit(model, train, validation, tiny_cfg(optimizer), "accuracy", 0.4, 0.3)
        runs.append(predict_proba(model, validation.pixels, 0.4, 0.3))
    assert result.best_score > 0.95 and len(result.history) == 3
    assert np.array_equal(runs[0], runs[1])


def test_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    from tasks.vision.train import fit

    train, validation = blobs(300, 2), blobs(60, 3)
    whole = document()
    fit(whole, train, validation, tiny_cfg(epochs=3), "accuracy", 0.4, 0.3)
    first = fit(document(), train, validation, tiny_cfg(epochs=2), "accuracy", 0.4, 0.3, tmp_path)
    assert first.resumed_from_epoch is None and (tmp_path / "last.pt").exists()
    resumed_model = document(seed=5)  # different init: everything must come from the checkpoint
    resumed = fit(resumed_model, train, validation, tiny_cfg(epochs=3), "accuracy", 0.4, 0.3, tmp_path)
    assert resumed.resumed_from_epoch == 2 and len(resumed.history) == 3
    x = torch.from_numpy(validation.pixels.astype(np.float32))
    assert torch.equal(whole.eval()(x)[0], resumed_model.eval()(x)[0])
