"""`python -m memengine plan`: a value it cannot use gets one line naming the flag and exit status 2, never a
traceback (issue 19: --heads 30 and --layers 0 printed tracebacks); a good call prints the plan."""

import pytest

from memengine.cli import main

SMALL = ["plan", "--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "32", "--budget", "1GiB"]


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--heads", "30"], "--heads 30 does not divide --hidden 64"),
        (["--layers", "0"], "--layers must be at least 1"),
        (["--seq", "0"], "--seq must be positive"),
        (["--micro-batch", "0"], "--micro-batch must be positive"),
        (["--budget", "150%"], "--budget 150%"),
        (["--budget", "0"], "--budget 0: give a size"),
    ],
)
def test_a_bad_value_gets_one_line_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL, *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error and "Traceback" not in error, error


def test_a_good_call_prints_the_plan(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(SMALL)
    assert exit_info.value.code == 0
    assert "baselines" in capsys.readouterr().out


def test_a_percentage_budget_keeps_that_share_of_the_blocks_activations(capsys):
    """--budget 50% means what Engine(budget="50%") and the demo's --budget 50% mean: half of the activations
    kept (here the blocks' activations without recomputation, which is what `plan` budgets)."""
    deeper = ["plan", "--layers", "8", "--hidden", "64", "--heads", "4", "--seq", "32", "--budget"]
    with pytest.raises(SystemExit) as exit_info:
        main([*deeper, "100%"])
    assert exit_info.value.code == 0
    everything = capsys.readouterr().out
    full = int(everything.split("budget ")[1].split(" bytes")[0].replace(",", ""))
    with pytest.raises(SystemExit) as exit_info:
        main([*deeper, "50%"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"budget {full // 2:,} bytes" in out and "recompute" in out, out
