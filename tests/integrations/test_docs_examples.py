"""Every Python block of docs/integrations.md runs as it is, each in a fresh namespace."""

import pathlib
import re

import pytest

DOCUMENT = pathlib.Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOCUMENT.read_text(), flags=re.DOTALL)


def test_the_page_has_its_examples():
    assert len(BLOCKS) == 3  # Trainer, accelerate, LoRA with peft


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index, capsys):
    exec(compile(BLOCKS[index], f"{DOCUMENT.name}, block {index + 1}", "exec"), {"__name__": "__docs__"})
    printed = capsys.readouterr().out
    assert "loss" in printed and "grad_norm" in printed, printed
