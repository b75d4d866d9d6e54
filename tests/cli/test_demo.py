"""`python -m memengine demo --quick`, run once as a user runs it: the claims its table makes hold
on its own results.json, results.csv carries every number of the table, the plots are real PNGs,
and bad flags get one-line errors naming the flag. Nothing here checks timings (the machine is shared)."""

import csv
import json
import os
import subprocess
import sys

import pytest

from memengine.cli import demo as demo_cli
from memengine.cli import main
from memengine.studies import demo

PIL = pytest.importorskip("PIL.Image", reason="reading the demo's PNGs back needs Pillow (pip install matplotlib)")
pytest.importorskip("matplotlib", reason="the demo's plots need matplotlib (pip install matplotlib)")


def memengine_command(*args, timeout=300):
    # One thread: on a CPU shared with other jobs, OpenMP's spinning threads made one step 20x slower
    # (2 s against 0.09 s measured); the numbers checked here do not depend on the thread count.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "memengine", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = memengine_command("demo", "--quick", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, out, json.loads((out / "results.json").read_text())


def rows(results):
    return {m["name"]: m for m in results["methods"]}


def test_memengine_peaks_are_below_pytorch_accumulation(quick_run):
    row = rows(quick_run[2])
    for ours in ("memengine", "memengine-budget"):
        for theirs in ("pytorch-accumulation", "pytorch-fp32-grads"):
            assert row[ours]["peak_bytes"] < row[theirs]["peak_bytes"], (ours, theirs)


def test_budgeted_row_fits_its_budget_and_its_prediction(quick_run):
    budgeted = rows(quick_run[2])["memengine-budget"]
    assert budgeted["budget_bytes"] == quick_run[2]["budget_bytes"]
    assert budgeted["peak_bytes"] <= budgeted["budget_bytes"]
    predicted = budgeted["predicted_peak_bytes"]
    assert abs(budgeted["peak_bytes"] - predicted) <= demo.PEAK_PREDICTION_TOLERANCE * predicted
    # At the default size (a 32,000-token vocabulary) memengine's whole-step peak is its optimizer step: the
    # default budget (half of row 5's activations) is below the smallest feasible one, which row 6 takes, and the
    # notes say so. test_with_a_small_vocabulary_the_default_budget_recomputes covers the other regime.
    assert quick_run[2]["budget_bytes"] == quick_run[2]["smallest_feasible_budget"]
    assert any("is below the smallest feasible" in note for note in quick_run[2]["notes"])


def test_with_a_small_vocabulary_the_default_budget_recomputes(tmp_path):
    """--vocab 256, one row per micro-batch: the blocks' activations are the step's peak, and the default budget
    keeps half of them by recomputing blocks, within the budget and the prediction."""
    result = memengine_command(
        "demo",
        "--quick",
        "--device",
        "cpu",
        "--vocab",
        "256",
        "--seq",
        "128",
        "--micro-batch",
        "1",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    budgeted = rows(results)["memengine-budget"]
    assert "recompute" in budgeted["plan"], "the default budget (half of row 5's activations) must recompute"
    assert budgeted["peak_bytes"] <= budgeted["budget_bytes"]
    assert all(claim["holds"] for claim in results["claims"]), results["claims"]


def test_memengine_gradient_error_is_at_most_fp32_accumulation_and_below_bf16(quick_run):
    row = rows(quick_run[2])
    assert row["memengine"]["gradient_error"] <= row["pytorch-fp32-grads"]["gradient_error"]
    assert row["memengine"]["gradient_error"] < row["pytorch-accumulation"]["gradient_error"]
    # Same recipe, same arithmetic: checkpointing recomputes the same bf16 values.
    assert row["pytorch-checkpointing"]["gradient_error"] == row["pytorch-accumulation"]["gradient_error"]


def test_every_method_loss_decreases(quick_run):
    for method in quick_run[2]["methods"]:
        assert len(method["losses"]) == quick_run[2]["config"]["steps"]
        assert method["losses"][-1] < method["losses"][0], method["name"]


def test_printed_claims_agree_with_the_results(quick_run):
    stdout, _, results = quick_run
    assert [claim["holds"] for claim in results["claims"]] == [True] * len(results["claims"])
    for claim in results["claims"]:
        assert f"[ok] {claim['claim']}" in stdout


def test_csv_carries_every_number_of_the_table(quick_run):
    stdout, out, results = quick_run
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [m["name"] for m in results["methods"]]
    lines = stdout.splitlines()
    for number, (row, method) in enumerate(zip(table, results["methods"], strict=True), 1):
        printed = next(line for line in lines if line.startswith(f"{number} {method['label']}"))
        cells = printed[len(f"{number} {method['label']}") :].split()
        assert cells == [fmt(float(row[field])) for _, field, fmt in demo_cli.COLUMNS], printed
        assert float(row["peak_bytes"]) == method["peak_bytes"]


def test_plots_are_pngs_of_the_expected_size(quick_run):
    _, out, _ = quick_run
    expected = (demo_cli.PLOT_SIZE[0] * demo_cli.PLOT_DPI, demo_cli.PLOT_SIZE[1] * demo_cli.PLOT_DPI)
    for name in ("memory_vs_time.png", "loss.png"):
        with PIL.open(out / name) as image:
            assert image.format == "PNG" and image.size == expected, name
            colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
            assert colours is None or len(colours) > 20, f"{name} is (nearly) blank"


def results_of(results_json):
    """The DemoResults a run wrote to results.json."""
    import dataclasses

    method_fields = {f.name for f in dataclasses.fields(demo.MethodResult)}
    result_fields = {f.name for f in dataclasses.fields(demo.DemoResults)}
    methods = [demo.MethodResult(**{k: v for k, v in m.items() if k in method_fields}) for m in results_json["methods"]]
    return demo.DemoResults(**{**{k: v for k, v in results_json.items() if k in result_fields}, "methods": methods})


def drawn_texts(figure, monkeypatch):
    """(text, bounding box) of every non-empty text the figure draws (tick labels beyond an axis's limits exist
    as objects but are not drawn)."""
    import matplotlib.text

    drawn = []
    draw = matplotlib.text.Text.draw

    def recording(text, renderer):
        draw(text, renderer)
        if text.get_visible() and text.get_text().strip():
            drawn.append((text.get_text(), text.get_window_extent(renderer)))

    with monkeypatch.context() as patch:
        patch.setattr(matplotlib.text.Text, "draw", recording)
        figure.canvas.draw()
    return drawn


def test_no_two_labels_of_a_picture_overlap_and_byte_axes_start_at_zero(quick_run, monkeypatch):
    """Issue 19: the row 2 and row 3 labels overprinted each other, and the memory axis started near 57 MiB."""
    import itertools

    from matplotlib import pyplot

    results = results_of(quick_run[2])
    for make_figure in (demo_cli.memory_figure, demo_cli.loss_figure):
        figure = make_figure(results)
        boxes = drawn_texts(figure, monkeypatch)
        assert len(boxes) > 10, boxes
        for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2):
            assert not box_a.overlaps(box_b), f"{make_figure.__name__}: {a!r} overlaps {b!r}"
        if make_figure is demo_cli.memory_figure:
            assert all(axes.get_xlim()[0] == 0 for axes in figure.axes), [axes.get_xlim() for axes in figure.axes]
        pyplot.close(figure)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--layers", "1"], "--layers"),
        (["--heads", "3"], "--heads"),
        (["--micro-batch", "9", "--batch", "4"], "--micro-batch"),
        (["--steps", "2"], "--steps"),
        (["--dtype", "fp16"], "--dtype"),
        (["--layers", "two"], "--layers"),
        (["--budget", "lots"], "--budget"),
        (["--budget", "150%"], "--budget"),
        (["--model", "bert"], "--model"),
    ],
)
def test_bad_flags_get_one_line_naming_the_flag(flags, named, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["demo", "--device", "cpu", *flags])
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], lines


def test_budget_below_the_smallest_feasible_names_the_minimum(tmp_path):
    result = memengine_command("demo", "--quick", "--device", "cpu", "--budget", "1MiB", "--out", str(tmp_path))
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1].split("\r")[-1]
    assert error.startswith("python -m memengine demo: error: --budget 1MiB:") and "smallest feasible" in error, error
    assert "MiB (" in error.split("smallest feasible")[1], error
    assert not (tmp_path / "results.json").exists()


def test_help_lists_the_three_commands():
    result = memengine_command("--help", timeout=60)
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ") and line.split()]
    assert listed == ["demo", "info", "plan"], result.stdout
