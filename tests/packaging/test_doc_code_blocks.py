"""Every code block of README.md and docs/*.md runs, so the documents cannot drift from the code.

What happens to each fenced block, by its language label:
- python: executed in this process, each block in a fresh namespace: every example is complete on
  its own, as a reader pastes it. The random seed is fixed first, the working directory is a
  temporary one, and torch runs one thread (as the commands below do: OMP_NUM_THREADS=1), since
  the examples are tiny and extra threads on a shared CPU only slow them down. Tracebacks name the
  document and its line.
- bash: each command line is run or skipped by the rules of BASH_COMMANDS_SKIPPED: a
  `python -m memengine ...` line (after optional VAR=value assignments) runs in a subprocess from
  the repository root and must exit with 0; `make`, `pip` and `cmake` lines are skipped, saying
  why; a command no rule names fails, so a new kind of command gets a rule before it is documented.
- text, or no label: not code (layouts, diagrams, output); nothing to run.
- any other label fails: a block labelled `py` or `sh` would escape execution unnoticed.

docs/integrations.md's Python blocks train with Trainer and accelerate and are executed by
tests/integrations/test_docs_examples.py; here they are skipped, saying so.
"""

import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import traceback

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_CODE = {"", "text"}
EXECUTED_ELSEWHERE = {
    ROOT / "docs" / "integrations.md": "tests/integrations/test_docs_examples.py executes its Python blocks",
}
BASH_COMMANDS_SKIPPED = {
    "make": "creates a virtual environment, downloads torch and compiles the extension (minutes, network); "
    "tests/packaging/test_makefile.py checks the Makefile and CI runs `make test`",
    "pip": "installs packages into the environment (network); tests/packaging/test_distribution.py checks "
    "the installed distribution",
    "cmake": "compiles the C++ tests (minutes); `make test` runs them",
}
COMMAND_TIMEOUT_S = 300
FENCE = re.compile(r"^\s*```(.*)$")  # any fence, indented or not: an unusual one fails below, never hides


@dataclasses.dataclass(frozen=True)
class Block:
    document: pathlib.Path
    line: int  # of the first line inside the fence, 1-based
    language: str
    text: str

    def __str__(self):
        return f"{shown(self.document)}:{self.line}"


def shown(path):
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def code_blocks(document):
    """The fenced blocks of a Markdown file, in order."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(document.read_text().splitlines(), start=1):
        fence = FENCE.match(line)
        if language is None and fence:
            language, start, lines = fence.group(1).strip(), number + 1, []
        elif language is not None and line.strip() == "```":
            blocks.append(Block(document, start, language, "\n".join(lines) + "\n"))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{shown(document)}: the fence opened at line {start - 1} is never closed"
    return blocks


def run_python_block(block):
    """Executes a Python block in a fresh namespace; its line numbers are the document's own."""
    code = compile("\n" * (block.line - 1) + block.text, str(block.document), "exec")
    exec(code, {"__name__": "__doc_example__"})


def bash_commands(block):
    """(line number, environment assignments, argv) of each command line of a bash block."""
    for offset, line in enumerate(block.text.splitlines()):
        words = shlex.split(line, comments=True)
        assignments = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
            name, value = words.pop(0).split("=", 1)
            assignments[name] = value
        if words:
            yield block.line + offset, assignments, words


def run_bash_command(assignments, argv):
    """Runs a documented command or skips it, saying why; fails for a command no rule covers."""
    if argv[0] in BASH_COMMANDS_SKIPPED:
        pytest.skip(f"`{argv[0]}` is not run: it {BASH_COMMANDS_SKIPPED[argv[0]]}")
    if argv[:3] != ["python", "-m", "memengine"]:
        pytest.fail(f"no rule for the documented command {shlex.join(argv)!r}: run it here or skip it, saying why")
    result = subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **assignments},
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 0, f"{shlex.join(argv)} exited with {result.returncode}:\n{result.stderr[-4000:]}"


BLOCKS = [block for document in DOCUMENTS for block in code_blocks(document)]
PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python"]
BASH_COMMANDS = [
    pytest.param(assignments, argv, id=f"{shown(block.document)}:{line}")
    for block in BLOCKS
    if block.language == "bash"
    for line, assignments, argv in bash_commands(block)
]


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_every_block_is_labelled_with_a_language_this_test_knows(block):
    assert block.language in {"python", "bash"} | NOT_CODE, (
        f"{block}: a ```{block.language} block is neither run nor declared not to be code; "
        "label it python, bash or text"
    )


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=str)
def test_python_block_runs(block, tmp_path, monkeypatch):
    if block.document in EXECUTED_ELSEWHERE:
        pytest.skip(EXECUTED_ELSEWHERE[block.document])
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the examples are tiny: on a shared CPU, more threads only wait for each other
    try:
        run_python_block(block)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("assignments", "argv"), BASH_COMMANDS)
def test_bash_command_runs(assignments, argv):
    run_bash_command(assignments, argv)


def test_readme_has_an_example_of_each_entry_point():
    readme_code = "".join(block.text for block in PYTHON_BLOCKS if block.document.name == "README.md")
    for call in ("memengine.patch(", "memengine.Engine(", "memengine.checkpoint(", "memengine.segment("):
        assert call in readme_code, f"README.md has no Python example calling {call}...)"


def test_the_documents_have_python_and_command_blocks():
    # Guards the extraction itself: a fence pattern that stopped matching would run nothing and pass.
    assert len(PYTHON_BLOCKS) >= 10
    assert any(argv[:3] == ["python", "-m", "memengine"] for _, argv in (p.values for p in BASH_COMMANDS))


def test_a_broken_example_fails_and_names_its_document_line(tmp_path):
    document = tmp_path / "page.md"
    document.write_text("# Page\n\ntext\n\n```python\nimport torch\n\ntorch.ones(2) @ torch.ones(3)\n```\n")
    (block,) = code_blocks(document)
    with pytest.raises(RuntimeError) as failure:
        run_python_block(block)
    where = traceback.extract_tb(failure.tb)[-1]
    assert (where.filename, where.lineno) == (str(document), 8)


def test_an_unclosed_fence_fails(tmp_path):
    document = tmp_path / "page.md"
    document.write_text("```python\nprint(1)\n")
    with pytest.raises(AssertionError, match="never closed"):
        code_blocks(document)


def test_bash_commands_are_run_skipped_or_refused():
    block = Block(ROOT / "README.md", 10, "bash", "make test  # comment\nFOO=1 python -m memengine info\nls -l\n")
    commands = list(bash_commands(block))
    assert commands == [
        (10, {}, ["make", "test"]),
        (11, {"FOO": "1"}, ["python", "-m", "memengine", "info"]),
        (12, {}, ["ls", "-l"]),
    ]
    with pytest.raises(pytest.skip.Exception, match="`make` is not run"):
        run_bash_command(*commands[0][1:])
    with pytest.raises(pytest.fail.Exception, match="no rule for the documented command 'ls -l'"):
        run_bash_command(*commands[2][1:])
    with pytest.raises(AssertionError, match="exited with 2"):
        run_bash_command({}, ["python", "-m", "memengine", "no-such-command"])
