"""Rank heatmap and rank history pictures: the table behind them, the files, and bad input."""

from __future__ import annotations

import pytest

from prunedlora.errors import PrunedLoraError
from prunedlora.train.plots import PlotError, plot_rank_heatmap, plot_rank_history, rank_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _llama_ranks(layers: int = 30, r0: int = 32) -> dict[str, int]:
    ranks = {}
    for layer in range(layers):
        for j, t in enumerate(TYPES):
            parent = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            ranks[f"model.layers.{layer}.{parent}.{t}"] = (layer * 7 + j * 3) % (r0 + 1)
    return ranks


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_rank_table_orders_layers_numerically_and_types_canonically():
    ranks = dict(reversed(list(_llama_ranks(layers=12).items())))  # order of the dict must not matter
    rows, cols, grid = rank_table(ranks)
    assert rows == [str(i) for i in range(12)]
    assert cols == ["q", "k", "v", "o", "gate", "up", "down"]
    assert grid[10][6] == ranks["model.layers.10.mlp.down_proj"]
    assert grid[2][0] == ranks["model.layers.2.self_attn.q_proj"]


def test_rank_table_handles_missing_cells_other_modules_and_peft_prefixes():
    ranks = {
        "base_model.model.model.layers.1.self_attn.v_proj": 3,
        "base_model.model.model.layers.0.self_attn.q_proj": 8,
        "base_model.model.lm_head": 2,
        "model.layers.0.mlp.custom_lin": 1,
    }
    rows, cols, grid = rank_table(ranks)
    assert rows == ["0", "1", "other"]
    assert cols == ["q", "v", "custom_lin", "lm_head"]
    assert grid == [[8, None, 1, None], [None, 3, None, None], [None, None, None, 2]]


def test_heatmap_and_history_write_pngs(tmp_path):
    ranks = _llama_ranks()
    heat = plot_rank_heatmap(ranks, tmp_path / "sub" / "ranks.png", r0=32, title="ranks")
    assert heat == tmp_path / "sub" / "ranks.png" and _is_png(heat)
    history = [
        {"step": step, "ranks": {name: max(1, rank - step // 10) for name, rank in ranks.items()}}
        for step in (30, 10, 20)  # out of order on purpose
    ]
    hist = plot_rank_history(history, tmp_path / "history.png")
    assert _is_png(hist)
    assert _is_png(plot_rank_history(history[:1], tmp_path / "one.png"))


def test_heatmap_of_a_single_module(tmp_path):
    assert _is_png(plot_rank_heatmap({"lm_head": 4}, tmp_path / "one.png", r0=8))


@pytest.mark.parametrize(
    "ranks,message",
    [
        ({}, "empty"),
        ({"model.layers.0.self_attn.q_proj": -1}, "non-negative integer"),
        ({"model.layers.0.self_attn.q_proj": 2.5}, "non-negative integer"),
        ({"": 3}, "not a dotted module path"),
        ({"model.layers.0.self_attn.q_proj": 40}, "exceed r0=32"),
        ({"encoder.layers.0.q_proj": 3, "decoder.layers.0.q_proj": 4}, "same heatmap cell"),
    ],
)
def test_heatmap_rejects_bad_ranks(tmp_path, ranks, message):
    out = tmp_path / "bad.png"
    with pytest.raises(PlotError, match=message):
        plot_rank_heatmap(ranks, out, r0=32)
    assert not out.exists()


def test_heatmap_rejects_bad_r0(tmp_path):
    with pytest.raises(PlotError, match="r0 must be a positive integer"):
        plot_rank_heatmap({"model.layers.0.mlp.up_proj": 1}, tmp_path / "x.png", r0=0)


@pytest.mark.parametrize(
    "history,message",
    [
        ([], "empty"),
        ([{"ranks": {"a.0.q_proj": 1}}], "needs 'step' and 'ranks', found ranks"),
        ([{"step": 5, "ranks": {}}], "step 5"),
        (["step 5"], "needs 'step' and 'ranks'"),
    ],
)
def test_history_rejects_bad_events(tmp_path, history, message):
    with pytest.raises(PlotError, match=message):
        plot_rank_history(history, tmp_path / "bad.png")
    assert issubclass(PlotError, PrunedLoraError)
