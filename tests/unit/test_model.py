"""The Transformer classifier: shapes, padding invariance, checkpoint round trip, it can learn."""

from __future__ import annotations

import pytest
import torch

from models.transformer import TransformerClassifier, TransformerConfig


def make(pooling: str = "mean", **kw) -> TransformerClassifier:
    torch.manual_seed(0)
    cfg = TransformerConfig(**{"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "dropout": 0.1, "pooling": pooling, **kw})
    return TransformerClassifier(cfg, vocab_size=50, num_classes=3, max_length=16, pad_id=0)


def test_shapes_and_loss() -> None:
    model = make()
    ids = torch.randint(1, 50, (4, 7))
    logits, loss = model(ids, torch.ones_like(ids), torch.tensor([0, 1, 2, 1]))
    assert logits.shape == (4, 3)
    assert loss is not None and loss.ndim == 0 and loss.item() > 0
    assert model(ids, torch.ones_like(ids))[1] is None


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_padding_does_not_change_prediction(pooling: str) -> None:
    model = make(pooling).eval()
    ids = torch.randint(1, 50, (3, 5))
    mask = torch.ones_like(ids)
    padded_ids = torch.cat([ids, torch.zeros(3, 6, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(3, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        a, _ = model(ids, mask)
        b, _ = model(padded_ids, padded_mask)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_mask_matters() -> None:
    """Sanity check of the test above: changing a real token does change the output."""
    model = make().eval()
    ids = torch.randint(1, 50, (1, 5))
    other = ids.clone()
    other[0, 2] = (other[0, 2] % 49) + 1
    with torch.no_grad():
        assert not torch.allclose(model(ids, torch.ones_like(ids))[0], model(other, torch.ones_like(ids))[0])


def test_checkpoint_round_trip() -> None:
    model = make().eval()
    again = TransformerClassifier.from_checkpoint(model.checkpoint(labels=["a", "b", "c"])).eval()
    ids = torch.randint(1, 50, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, torch.ones_like(ids))[0], again(ids, torch.ones_like(ids))[0])


def test_heads_must_divide_width() -> None:
    with pytest.raises(ValueError, match="n_heads"):
        TransformerConfig(d_model=30, n_heads=4)


def test_learns_a_token_rule() -> None:
    """Class = whether token 7 occurs: a few hundred steps get it nearly right."""
    torch.manual_seed(0)
    model = TransformerClassifier(
        TransformerConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.0), 20, 2, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(200):
        ids = torch.randint(1, 20, (32, 10))
        ids[ids == 7] = 8
        y = torch.randint(0, 2, (32,))
        ids[y == 1, torch.randint(0, 10, (int(y.sum()),))] = 7
        _, loss = model(ids, torch.ones_like(ids), y)
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
        torch.testing.assert_close(base.eval()(ids, mask)[0], dropped.eval()(ids, mask)[0])  # eval: no effect
        torch.manual_seed(1)
        assert not torch.allclose(base.train()(ids, mask)[0], dropped.train()(ids, mask)[0])


def test_attention_dropout_defaults_to_dropout() -> None:
    assert make(dropout=0.3).blocks[0].attn.dropout == 0.3
    assert make(dropout=0.3, attention_dropout=0.05).blocks[0].attn.dropout == 0.05
