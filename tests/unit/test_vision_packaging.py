"""The image pyfunc without a registry: pixel input checks, predictions equal offline ones; CLI image loading."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flows.cli import _is_image_file, image_pixels
from models.vision import ImageModelConfig
from tasks.core.packaging import NightshiftModel
from tasks.vision.predict import pixel_rows
from tasks.vision.train import build_model, predict_proba

LABELS = [str(d) for d in range(10)]
NORMALIZATION = {"mean": 0.1307, "std": 0.3081, "scale": 255.0, "image_shape": [28, 28]}


@pytest.fixture
def served(tmp_path: Path) -> tuple[NightshiftModel, torch.nn.Module]:
    model = build_model(ImageModelConfig(kind="variant", hidden=[32, 16]), (28, 28), 10, seed=0).eval()
    torch.save(model.checkpoint(labels=LABELS, normalization=NORMALIZATION), tmp_path / "model.pt")
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    (tmp_path / "normalization.json").write_text(json.dumps(NORMALIZATION))
    (tmp_path / "bundle.json").write_text(json.dumps({"task": "image-classification",
                                                      "predictor": "tasks.vision.predict:ImagePredictor"}))
    pyfunc = NightshiftModel()
    pyfunc.load_context(SimpleNamespace(artifacts={"bundle": str(tmp_path)}))
    return pyfunc, model


def test_lists_and_arrays_give_the_offline_predictions(served) -> None:
    pyfunc, model = served
    pixels = np.random.default_rng(0).integers(0, 256, (4, 784), np.uint8)
    expected = predict_proba(model, pixels, NORMALIZATION["mean"], NORMALIZATION["std"])
    for cells in ([row.tolist() for row in pixels], list(pixels.astype(np.int64)), list(pixels)):
        out = pyfunc.predict(None, pd.DataFrame({"pixels": cells}))
        assert list(out.columns) == ["label", "label_name", "score", "probabilities"]
        assert out["label"].tolist() == [LABELS[i] for i in expected.argmax(1)]
        assert np.allclose(np.array(out["probabilities"].tolist()), expected, atol=1e-6)
        assert np.allclose(out["score"], expected.max(1), atol=1e-6)
    assert pyfunc.predict(None, pd.DataFrame({"pixels": []})).empty


def test_bad_pixels_are_named(served) -> None:
    pyfunc, _ = served
    with pytest.raises(ValueError, match="input needs a 'pixels' column"):
        pyfunc.predict(None, pd.DataFrame({"text": ["seven"]}))
    with pytest.raises(ValueError, match=r"pixels row 1: 783 values, expected 784"):
        pixel_rows([[0] * 784, [0] * 783], 784)
    with pytest.raises(ValueError, match=r"pixels row 0: values outside 0-255 \(min 0, max 256\)"):
        pixel_rows([[0] * 783 + [256]], 784)
    with pytest.raises(ValueError, match="got fractions"):
        pixel_rows([np.full(784, 0.5)], 784)


def test_cli_reads_png_and_pgm_as_greyscale(tmp_path: Path) -> None:
    digit = np.zeros((28, 28), np.uint8)
    digit[4:24, 12:16] = 255
    Image.fromarray(digit).save(tmp_path / "one.png")
    Image.fromarray(digit).save(tmp_path / "one.pgm")
    Image.fromarray(np.stack([digit] * 3, -1)).resize((56, 56), Image.Resampling.NEAREST).save(tmp_path / "big.png")
    for name in ("one.png", "one.pgm"):
        assert _is_image_file(tmp_path / name)
        assert image_pixels(tmp_path / name) == digit.reshape(-1).tolist()
    big = np.array(image_pixels(tmp_path / "big.png")).reshape(28, 28)
    assert big[14, 13] == 255 and big[0, 0] == 0
    assert image_pixels(tmp_path / "one.png", invert=True)[0] == 255
    (tmp_path / "note.txt").write_text("not an image")
    assert not _is_image_file(tmp_path / "note.txt") and not _is_image_file(tmp_path / "missing.png")
    no_suffix = tmp_path / "digit"
    no_suffix.write_bytes((tmp_path / "one.png").read_bytes())
    assert _is_image_file(no_suffix)
