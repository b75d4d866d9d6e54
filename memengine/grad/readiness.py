"""Per-parameter readiness during one backward pass: a parameter is ready when the last contribution
the backward makes to its gradient has landed in main_grad.

How many contributions that is cannot be read off the graph in general: a tied weight gets one
per use, recomputed segments (memengine.checkpoint, memengine.segment, Hugging Face gradient
checkpointing) run their backward inside the outer one, an unused parameter gets none. So, as
torch DDP's static_graph does, the count is learned: the first watched backward only counts (no
parameter is signalled ready during it; `finish` reports them all), and every later one signals
a parameter the moment its count reaches the learned one. A contribution beyond the learned
count means the graph changed after something may already have been launched on the strength of
the old count: that raises, never passes silently. Fewer contributions than learned are safe
(the parameter is simply reported by `finish`, after the backward).
"""

from memengine.grad.hooks import parameter_name


class Readiness:
    """Watches the contributions to a GradBuffer's parameters during the backward passes between
    `watch()` and `finish()`, calling on_ready(p) once per parameter as soon as it is complete."""

    def __init__(self, buffer, on_ready):
        self.buffer = buffer
        self.on_ready = on_ready
        self.expected = None  # id(p) -> contributions per watched backward, learned by the first one
        self._counts = {}
        self._signalled = set()
        self._watching = False
        self._handle = buffer.register_contribution_hook(self._contributed)

    @property
    def learned(self):
        return self.expected is not None

    def watch(self):
        """Starts watching (call right before the backward). Parameters learned to get no contribution
        are ready at once, in buffer order."""
        self._counts = {id(p): 0 for p in self.buffer.params}
        self._signalled = set()
        self._watching = True
        if self.learned:
            for p in self.buffer.params:
                if self.expected[id(p)] == 0:
                    self._signal(p)

    def _signal(self, p):
        self._signalled.add(id(p))
        self.on_ready(p)

    def _contributed(self, p):
        if not self._watching:
            return
        count = self._counts[id(p)] = self._counts[id(p)] + 1
        if not self.learned:
            return
        expected = self.expected[id(p)]
        if count > expected:
            self._watching = False
            raise RuntimeError(
                f"memengine data parallelism: {parameter_name(p, self.buffer.module)} received contribution "
                f"{count} to its gradient in this backward, but the first step's backward gave it {expected}, so "
                "its reduction may already have been launched without this one. The model's graph changed between "
                "steps (a layer used a varying number of times, a data-dependent branch); build the Engine with "
                "overlap=False, which reduces only after the backward has finished"
            )
        if count == expected:
            self._signal(p)

    def finish(self):
        """Stops watching (after the backward); returns the parameters not signalled ready during it, in
        buffer order. The first call learns the contribution counts."""
        self._watching = False
        if not self.learned:
            self.expected = dict(self._counts)
        return [p for p in self.buffer.params if id(p) not in self._signalled]

    def abandon(self):
        """Stops watching a backward that raised, learning nothing from it."""
        self._watching = False

    def remove(self):
        self._handle.remove()
