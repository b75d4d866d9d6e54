"""The distribution is named torch-memengine and provides the package `memengine`.

"memengine" on PyPI is an unrelated project, so nothing may tell users to `pip install memengine`
(that installs someone else's code), and the installed metadata must carry our own name.
"""

import ast
import importlib.metadata
import json
import pathlib
import re

import pytest

import memengine

ROOT = pathlib.Path(__file__).resolve().parents[2]
DISTRIBUTION = "torch-memengine"
FOREIGN_NAME = "memengine"  # taken on PyPI by an unrelated project

# `pip install`, any options, then a package *name* that is ours or PyPI's "memengine" (normalised
# spellings included). Paths (`.`, `./x`, `*.whl`) do not match: they install this checkout.
PIP_INSTALL_BY_NAME = re.compile(
    r"pip3?\s+install(?:\s+-{1,2}[\w-]+(?:=\S+)?)*\s+[`'\"]?(?:torch[-_.])?memengine(?![\w./-])",
    re.IGNORECASE,
)


def _string_constants(path):
    """Every string literal of a Python file; adjacent literals arrive joined, as Python joins them."""
    tree = ast.parse(path.read_text())
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _setup_keyword(name):
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1, "setup.py should call setup() once"
    (keyword,) = [k for k in calls[0].keywords if k.arg == name]
    return ast.literal_eval(keyword.value)


def _is_this_checkout(distribution):
    """Whether `distribution` is memengine installed from this checkout (editable or not)."""
    direct_url = distribution.read_text("direct_url.json")
    if direct_url and json.loads(direct_url).get("url", "").rstrip("/") == ROOT.as_uri():
        return True
    init = pathlib.Path(memengine.__file__).resolve()
    return any(
        str(f) == "memengine/__init__.py" and distribution.locate_file(f).resolve() == init
        for f in distribution.files or []
    )


def _installed(name):
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _skip_if_installed_under_the_old_name():
    old = _installed(FOREIGN_NAME)
    if old is not None and _is_this_checkout(old):
        pytest.skip(
            f"this environment holds memengine installed before the rename, as the distribution "
            f"'{FOREIGN_NAME}' ({old.locate_file('')}); reinstall it to check the new name: "
            "`pip uninstall memengine && pip install --no-build-isolation -e .` in the checkout"
        )


def test_setup_declares_the_distribution_name():
    assert _setup_keyword("name") == DISTRIBUTION


def test_pip_install_by_name_pattern_catches_the_old_message():
    # The scan below is only as good as this pattern: the old setup.py message must match it.
    assert PIP_INSTALL_BY_NAME.search("then run `pip install --no-build-isolation memengine` (or ...)")
    assert PIP_INSTALL_BY_NAME.search("pip install torch-memengine")
    assert not PIP_INSTALL_BY_NAME.search("`pip install --no-build-isolation .` in a checkout")
    assert not PIP_INSTALL_BY_NAME.search("pip install ./dist/torch_memengine-0.1.0-cp311-linux_x86_64.whl")


@pytest.mark.parametrize(
    "path",
    [ROOT / "setup.py", *sorted((ROOT / "memengine").rglob("*.py"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_message_says_to_pip_install_memengine_by_name(path):
    offending = [text for text in _string_constants(path) if PIP_INSTALL_BY_NAME.search(text)]
    assert not offending, (
        f"{path.relative_to(ROOT)} tells users to install memengine by name, which fetches the unrelated PyPI "
        f"project '{FOREIGN_NAME}' (or whoever owns the name); say to install from the checkout "
        f"(`pip install --no-build-isolation .`) instead: {offending}"
    )


def test_installed_distribution_is_torch_memengine_and_provides_memengine():
    _skip_if_installed_under_the_old_name()
    ours = _installed(DISTRIBUTION)
    if ours is None:
        pytest.skip(f"no distribution '{DISTRIBUTION}' is installed: memengine runs from a source tree here")
    assert ours.metadata["Name"] == DISTRIBUTION
    assert ours.version == memengine.__version__
    assert DISTRIBUTION in importlib.metadata.packages_distributions().get("memengine", [])


def test_no_distribution_named_memengine_is_installed():
    _skip_if_installed_under_the_old_name()
    foreign = _installed(FOREIGN_NAME)
    assert foreign is None, (
        f"a distribution named '{FOREIGN_NAME}' is installed ({foreign.metadata['Summary']!r}, "
        f"{foreign.locate_file('')}): that is an unrelated PyPI project, not this one, and its top-level "
        "package may shadow ours; `pip uninstall memengine`"
    )
