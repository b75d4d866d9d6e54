"""LiveBytes: the bytes of tensor storages created while it is active and still alive, and their
peak. A dispatch-mode tracker, so it works the same on CPU, CUDA and the meta device (where no
allocator exists), and sees every op of a forward, of autograd's backward and of recomputation.

What counts: each storage that an op's output brings into existence, once, for as long as any
tensor that the tracker saw on it is alive (storages kept alive only by C++ references are
followed through PyTorch's tensor object preservation). What does not: storages that existed
before (parameters, inputs, preallocated gradients), outputs that alias an input (views,
in-place ops) and scratch memory a kernel allocates and frees inside one op.

    with LiveBytes() as tracker:
        loss = model(x).sum()
        tracker.mark()          # bytes alive now, and start a new peak window
        loss.backward()
    tracker.peak, tracker.window_peak
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self._tensors = {}  # storage key -> number of live tensors the tracker saw on it
        self.current = 0  # bytes of live tracked storages
        self.peak = 0  # largest `current` since the tracker started
        self.window_peak = 0  # largest `current` since the last mark()

    def mark(self):
        """Starts a new peak window at the current bytes; returns them."""
        self.window_peak = self.current
        return self.current

    def _release(self, key, nbytes):
        self._tensors[key] -= 1
        if self._tensors[key] == 0:
            del self._tensors[key]
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage._cdata, storage.nbytes()
            if key in self._tensors:
                self._tensors[key] += 1
            elif key in inputs:
                continue  # a view of, or an in-place write into, a storage from before
            else:
                self._tensors[key] = 1
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                self.window_peak = max(self.window_peak, self.current)
            weakref.finalize(t, self._release, key, nbytes)
        return out
