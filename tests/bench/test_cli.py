"""`prunedlora bench`: the subcommands exist, and bad input fails in one line before anything heavy runs."""

from __future__ import annotations

import pytest

from prunedlora.cli import build_parser, main


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "latency", "--help"], ["bench", "quality", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 0
    assert "usage: prunedlora bench" in capsys.readouterr().out


def test_bench_needs_a_kind(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "latency", "--slots", "12"], "not slot ranks vLLM allows"),
        (["bench", "latency", "--output-tokens", "1"], "at least 2"),
        (["bench", "quality", "--methods", "lora,adalora"], "unknown method"),
        (["bench", "quality", "--tasks", "mnli"], "unknown task"),
        (["bench", "quality", "--report-only", "--force"], "cannot --force"),
        (["bench", "quality", "--data-dir", "/nonexistent/data", "--list"], "is not a folder"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"prunedlora {argv[0]}: error:") and message in err and "\n" not in err


def test_latency_refuses_a_folder_that_is_not_a_run(tmp_path, tiny_model_path, capsys):
    code = main(
        [
            "bench",
            "latency",
            "--model",
            str(tiny_model_path),
            "--run",
            str(tmp_path),
            "--work-dir",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 2 and "is not a finished `prunedlora train` run" in capsys.readouterr().err


def test_latency_quick_uses_the_quick_settings_unless_an_option_says_otherwise(monkeypatch, tmp_path):
    import prunedlora.bench.latency as latency

    seen = []

    def fake_run(config):
        seen.append(config)
        raise latency.LatencyBenchError("stop here")

    monkeypatch.setattr(latency, "run_latency_bench", fake_run)
    assert main(["bench", "latency", "--quick", "--out", str(tmp_path)]) == 2
    assert main(["bench", "latency", "--quick", "--output-tokens", "8", "--mixes", "1,4", "--out", str(tmp_path)]) == 2
    assert main(["bench", "latency", "--out", str(tmp_path)]) == 2
    quick, overridden, full = seen
    assert {key: getattr(quick, key) for key in latency.QUICK_SETTINGS} == latency.QUICK_SETTINGS
    assert quick == latency.LatencyBenchConfig.quick(out_dir=str(tmp_path))
    assert overridden.output_tokens == 8 and overridden.mixes == [1, 4] and overridden.num_prompts == 8
    assert full == latency.LatencyBenchConfig(out_dir=str(tmp_path))


def test_latency_measures_both_lora_ops_and_the_mixed_rank_batch_unless_told(monkeypatch, tmp_path):
    import prunedlora.bench.cli as bench_cli
    import prunedlora.bench.latency as latency

    assert bench_cli.LATENCY_LORA_OPS == latency.BENCH_LORA_OPS  # the CLI's light copy of the choices
    seen = []

    def fake_run(config):
        seen.append(config)
        raise latency.LatencyBenchError("stop here")

    monkeypatch.setattr(latency, "run_latency_bench", fake_run)
    assert main(["bench", "latency", "--out", str(tmp_path)]) == 2
    assert main(["bench", "latency", "--lora-ops", "stock", "--mixed-ranks", "none", "--out", str(tmp_path)]) == 2
    assert main(["bench", "latency", "--lora-ops", "rank-aware", "--mixed-ranks", "2,8", "--out", str(tmp_path)]) == 2
    default, stock, rank_aware = seen
    assert default.lora_ops == "both" and default.mixed_ranks == [4, 8, 16]
    assert stock.lora_ops == "stock" and stock.mixed_ranks == []
    assert rank_aware.lora_ops == "rank-aware" and rank_aware.mixed_ranks == [2, 8]


def _quality_option_help(dest: str) -> str:
    """The help text of one `bench quality` option, read from the parser (not the wrapped --help)."""
    import argparse

    def subparser(parser, name):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices[name]

    quality = subparser(subparser(build_parser(), "bench"), "quality")
    return next(a.help for a in quality._actions if a.dest == dest)


@pytest.mark.parametrize("dest, names", [("methods", "METHODS"), ("tasks", "QUALITY_TASKS")])
def test_the_help_lists_exactly_the_bench_names(dest, names):
    # cli.py keeps these lists as text (it imports the quality bench lazily): this keeps the copies honest.
    from prunedlora.bench import quality

    listed = _quality_option_help(dest).split(":", 1)[1].replace(" ", "").split(",")
    assert listed == list(getattr(quality, names))
