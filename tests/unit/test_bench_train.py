"""Benchmarks: bench/train.py's pieces on a tiny scratch model (never MiniLM): the JSON shape, both loops
of each comparison seeing the same samples, the bare loop ending on our loop's exact weights, the FLOPs
formula and the threads recommendation. The subprocess thread study is marked slow."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TINY = {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32}
ROWS = 128


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """``bench.train``: bench/ is a folder of scripts beside the installed packages, imported from the root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(ROOT))
        return importlib.import_module("bench.train")


@pytest.fixture(scope="module")
def data(bench: ModuleType) -> tuple:
    """(split, tokenizer, vocab size, pad id) of ROWS SST-2 rows through a WordPiece tokenizer trained on them."""
    return bench.scratch_data(ROWS)


@pytest.fixture
def tiny(bench: ModuleType, data: tuple, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The benchmark with MiniLM swapped for a tiny scratch model (same data path, same Trainer set-up)."""
    split, tokenizer, vocab, pad = data
    monkeypatch.setattr(bench, "pretrained_data", lambda rows: (split, bench.hf_tokenizer_for(tokenizer), pad))
    monkeypatch.setattr(bench, "minilm_model", lambda: bench.scratch_model(vocab, pad, **TINY))
    monkeypatch.setattr(bench, "SCRATCH_MODEL", {**bench.SCRATCH_MODEL, **TINY})
    return bench


def test_benchmark_json_shape(tiny: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "out" / "train.json"
    assert tiny.main(["--json", str(path), "--quick", "--parts", "hf,bare", "--minilm-rows", str(ROWS),
                      "--scratch-rows", str(ROWS)]) == 0
    data = json.loads(path.read_text())

    assert {"name", "ours", "baseline", "ratio", "unit", "machine"} <= data.keys()
    assert data["name"] == "train" and data["unit"] == "samples/s" and data["ratio_definition"]
    assert isinstance(data["ratio"], float) and data["ratio"] > 0
    assert data["target"] == {"ratio": [">=", 1.2]} and isinstance(data["passed"], bool)
    assert data["mfu"] is None  # no CUDA here (and the part was not asked for)

    hf = data["minilm_vs_hf_trainer"]
    assert hf["ratio"]["median"] == data["ratio"] and len(hf["ratio"]["samples"]) == 1
    assert hf["same_samples"] is True and hf["same_steps"] is True
    steps = -(-ROWS // 32)
    for side in (hf["ours"], hf["baseline"]):
        assert side["samples"] == ROWS and side["steps"] == steps
        assert side["samples_per_s"]["median"] > 0 and side["seconds"]["median"] > 0
        assert side["tokens"] <= side["padded_tokens"] and 0 <= side["padding_fraction"] < 1
    assert hf["baseline"]["optimizer_steps"] == steps
    assert hf["ours"]["tokens"] == hf["baseline"]["tokens"]  # the same rows, the same real tokens
    assert hf["extras"] == {}  # --quick: the headline pair only

    bare = data["scratch_vs_bare_loop"]
    assert bare["same_samples"] is True and bare["weights_identical"] is True
    assert bare["ours"]["samples"] == bare["baseline"]["samples"] == ROWS
    assert bare["ours"]["padded_tokens"] == bare["baseline"]["padded_tokens"]  # same batches, same padding
    assert isinstance(bare["overhead_pct"], float)
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["versions"]["torch"]
    assert "(1) MiniLM" in tiny.report(data) and "(2) scratch" in tiny.report(data)


def test_bare_loop_matches_ours(bench: ModuleType, data: tuple) -> None:
    """Two epochs: the same batches in the same order through both loops, bit-identical weights after."""
    split, _, vocab, pad = data
    cfg = bench.train_cfg(1, epochs=2, batch_size=16, lr=1e-3)
    result = bench.compare_bare(lambda: bench.scratch_model(vocab, pad, **TINY), split, cfg, repeat=1,
                                warmup=False, log=lambda line: None)
    assert result["same_samples"] is True and result["weights_identical"] is True
    assert result["ours"]["samples"] == result["baseline"]["samples"] == 2 * ROWS
    assert result["ours"]["steps"] == result["baseline"]["steps"] == 2 * -(-ROWS // 16)


def test_extras_fused_adamw_and_random_sampler(bench: ModuleType, data: tuple) -> None:
    """The what-if arm swaps fit_loader's optimiser for the fused AdamW and puts it back; the Trainer with
    its default random sampler still sees every row once, with the same real tokens as ours."""
    import tasks.core.fit as fit_module

    split, tokenizer, vocab, pad = data
    cfg = bench.train_cfg(1, batch_size=32, lr=1e-3)
    original = fit_module.make_optimizer
    seen: list[bool] = []
    with bench.fused_fit_loader():
        patched = fit_module.make_optimizer
        model = bench.scratch_model(vocab, pad, **TINY)
        seen.append(patched(model, cfg, None).defaults["fused"])
        ours = bench.run_ours(model, split, cfg)
    assert seen == [True] and fit_module.make_optimizer is original
    rnd = bench.run_hf(bench.scratch_model(vocab, pad, **TINY), split, cfg, bench.hf_tokenizer_for(tokenizer), "random")
    assert rnd["samples"] == ours["samples"] == ROWS and rnd["tokens"] == ours["tokens"]
    assert rnd["optimizer_steps"] == ours["steps"] == -(-ROWS // 32)


def test_flops_formula(bench: ModuleType, data: tuple) -> None:
    _, _, vocab, pad = data
    model = bench.scratch_model(vocab, pad, **TINY)
    embeddings = model.encoder.tok_emb.weight.numel() + model.encoder.pos_emb.weight.numel()
    n = bench.non_embedding_parameters(model)
    assert n == model.num_parameters() - embeddings
    # two batches: 4 x 10 and 2 x 7 (B*T = 54, B*T^2 = 498)
    assert bench.training_flops(model, 54, 498) == 6 * n * 54 + 12 * 1 * 16 * 498
    assert bench.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12 and bench.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert bench.bf16_peak("NVIDIA H200") == 989e12 and bench.bf16_peak("Some CPU") is None
    if not torch.cuda.is_available():
        assert bench.mfu_cuda(32) is None


def test_thread_recommendation(bench: ModuleType) -> None:
    medians = {"threads=1,idle,default": 4.0, "threads=2,idle,default": 3.5, "threads=1,busy,default": 6.0,
               "threads=2,busy,default": 30.0, "threads=2,busy,PASSIVE": 5.0}
    assert bench.recommend_threads(medians)["threads"] == 1
    assert bench.recommend_threads(medians)["worst_case_seconds"] == {1: 6.0, 2: 30.0}
    assert len(bench.thread_cases("all")) == 8 and len(bench.thread_cases("quick")) == 6
    assert (1, False, "PASSIVE") not in bench.thread_cases("quick")


@pytest.mark.slow
def test_thread_study_subprocesses(bench: ModuleType, data: tuple) -> None:
    """Two cases in fresh subprocesses (5 s of imports each, more on a busy machine): one thread idle, one
    thread against a busy loop with OMP_WAIT_POLICY=PASSIVE."""
    split, _, vocab, pad = data
    result = bench.thread_study(ROWS, [(1, False, None), (1, True, "PASSIVE")], log=lambda line: None,
                                data=(split, vocab, pad))
    assert [c["samples"] for c in result["cases"]] == [ROWS, ROWS]
    assert set(result["median_seconds"]) == {"threads=1,idle,default", "threads=1,busy,PASSIVE"}
    assert all(c["seconds"] > 0 and c["cpu_seconds"] > 0 for c in result["cases"])
    assert result["cases"][1]["competing_process"] is True and result["recommendation"]["threads"] == 1
