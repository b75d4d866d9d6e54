"""Loads the compiled extension memengine._C, or records why it could not be loaded.

Importing _C registers the C++/CUDA kernels with the dispatcher. Without it memengine still
works on the pure-PyTorch reference kernels; the reason is reported once (a warning at
import) and by `python -m memengine info`.
"""

import warnings

C = None
load_error = None


class MemengineExtensionWarning(UserWarning):
    """The compiled kernels could not be loaded; memengine runs on its reference kernels."""


def load():
    global C, load_error
    try:
        from memengine import _C

        C = _C
    except ImportError as error:  # missing build, or built against another torch (undefined symbols)
        load_error = f"{type(error).__name__}: {error}"
        warnings.warn(
            "memengine: compiled kernels unavailable, using the pure-PyTorch reference kernels "
            f"({load_error}). Rebuild with `pip install --no-build-isolation -e .`; "
            "`python -m memengine info` shows details.",
            MemengineExtensionWarning,
            stacklevel=3,
        )


def build_info():
    """The build description from _C, or None when it is not loaded."""
    return None if C is None else dict(C.build_info())
