"""Planning leaves the model as it found it: me.segment(budget=, sample=) and me.Engine(budget=)
run a sample forward and profile the blocks, and neither may update a module buffer (BatchNorm
running statistics, inside or outside the blocks) or consume the global random number generator.
Training after planning is bit-identical to training an unplanned copy."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import memengine as me
from memengine.segments import profile as profile_module
from memengine.segments.apply import profile_sample as profile_recorded

WIDTH = 16


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(WIDTH, 2 * WIDTH)
        self.down = torch.nn.Linear(2 * WIDTH, WIDTH)
        self.norm = torch.nn.BatchNorm1d(WIDTH)

    def forward(self, x):
        return self.norm(x + self.down(F.dropout(F.gelu(self.up(x)), p=0.3, training=self.training)))


class Net(torch.nn.Module):
    """BatchNorm and dropout outside the blocks too: the sample forward runs all of it."""

    def __init__(self, blocks=4):
        super().__init__()
        self.stem = torch.nn.Linear(WIDTH, WIDTH)
        self.stem_norm = torch.nn.BatchNorm1d(WIDTH)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(blocks))
        self.head_norm = torch.nn.BatchNorm1d(WIDTH)

    def forward(self, x):
        x = F.dropout(self.stem_norm(self.stem(x)), p=0.1, training=self.training)
        for block in self.blocks:
            x = block(x)
        return self.head_norm(x)


def make_net(device):
    torch.manual_seed(0)
    return Net().to(device)


def loss_fn(model, batch):
    return model(batch).square().sum(), batch.shape[0]


def buffers(model):
    return {name: b.clone() for name, b in model.named_buffers()}


def rng_states(device):
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def assert_same_tensors(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def middle_budget(model, blocks_of, sample_of):
    """A budget between keeping everything and the smallest feasible one (so the plan recomputes),
    planned on a copy."""
    probe = copy.deepcopy(model)
    chain = profile_recorded(list(blocks_of(probe)), sample_of(probe))
    keep_all = me.plan.simulate(chain, me.plan.solve(chain, method="none"))["peak_bytes"]
    return (keep_all + me.plan.smallest_feasible_budget(chain)) // 2


DEVICES = [
    torch.device("cpu"),
    pytest.param(
        torch.device("cuda"),
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CUDA RNG needs one"),
    ),
]


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_segment_from_a_budget_changes_no_buffer_and_no_rng_state(device):
    model = make_net(device)
    reference = copy.deepcopy(model)
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1)).to(device)
    budget = middle_budget(model, lambda m: m.blocks, lambda m: lambda: loss_fn(m, x))

    torch.manual_seed(5)
    before_buffers, before_rng = buffers(model), rng_states(device)
    handle = me.segment(model.blocks, budget=budget, sample=lambda: loss_fn(model, x))
    assert any(s.policy != "keep" for s in handle.plan)
    assert_same_tensors(buffers(model), before_buffers)
    for after, before in zip(rng_states(device), before_rng, strict=True):
        assert torch.equal(after, before)

    # Training continues from the same RNG stream and statistics as an unplanned copy.
    def train(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        losses = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = loss_fn(net, x)[0]
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return losses

    losses = train(model)
    torch.manual_seed(5)
    expected_losses = train(reference)
    assert all(torch.equal(a, b) for a, b in zip(losses, expected_losses, strict=True))
    assert_same_tensors(dict(model.named_parameters()), dict(reference.named_parameters()))
    assert_same_tensors(buffers(model), buffers(reference))


def test_segment_of_a_sequential_from_a_sample_input_changes_no_buffer_and_no_rng_state():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*(Block() for _ in range(4)))
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))
    budget = middle_budget(blocks, lambda m: m, lambda m: x)
    before_buffers, before_rng = buffers(blocks), torch.get_rng_state()
    me.segment(blocks, budget=budget, sample=x)
    assert_same_tensors(buffers(blocks), before_buffers)
    assert torch.equal(torch.get_rng_state(), before_rng)


def test_engine_with_a_budget_trains_exactly_like_one_without():
    model = make_net("cpu")
    planned = copy.deepcopy(model)
    # Rows enough for the blocks' activations to outweigh the planning's own memory at the first step.
    batch = torch.randn(512, WIDTH, generator=torch.Generator().manual_seed(1))
    sgd = functools.partial(torch.optim.SGD, lr=0.1)
    # The Engine's budget is the whole step's: between its smallest feasible and no-recompute peaks.
    report = me.Engine(copy.deepcopy(model), sgd, micro_batch_size=256).memory_report(batch, loss_fn)
    assert report.smallest_feasible_budget < report.no_recompute_peak, str(report)
    budget = (report.smallest_feasible_budget + report.no_recompute_peak) // 2
    engines = [
        me.Engine(model, sgd, micro_batch_size=256),
        me.Engine(planned, sgd, micro_batch_size=256, budget=budget),
    ]

    results = []
    for engine in engines:
        torch.manual_seed(5)
        losses = [engine.step(batch, loss_fn)["loss"] for _ in range(2)]
        results.append((losses, torch.get_rng_state()))
    assert engines[1].segment_handle is not None
    assert any(s.policy != "keep" for s in engines[1].segment_handle.plan)
    (losses, rng), (planned_losses, planned_rng) = results
    assert all(torch.equal(a, b) for a, b in zip(losses, planned_losses, strict=True))
    assert torch.equal(rng, planned_rng)
    assert_same_tensors(dict(model.named_parameters()), dict(planned.named_parameters()))
    assert_same_tensors(buffers(model), buffers(planned))


# Timing on CUDA: kernels launch asynchronously, so the profiler waits for the device around each
# timed op and run. Without a GPU the wiring is checked with a stand-in for the synchronisation.


def test_synchronizer_waits_for_the_cuda_devices_only(monkeypatch):
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", waited.append)
    assert profile_module.synchronizer([]) is None
    assert profile_module.cuda_devices([torch.ones(1), torch.ones(1, device="meta")]) == []
    devices = [torch.device("cuda", 1), torch.device("cuda", 0)]
    profile_module.synchronizer(devices)()
    assert waited == devices


class Clock:
    """Stands in for the profiler's clock and device synchronisation, recording their order."""

    def __init__(self):
        self.events = []

    def perf_counter(self):
        self.events.append("clock")
        return float(len(self.events))

    def synchronize(self):
        self.events.append("wait")


def test_each_measured_op_is_timed_between_device_waits(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(profile_module, "_time", clock)
    a, b = torch.ones(2, 2), torch.ones(2, 2)
    with profile_module._OpRecorder(measure=True, synchronize=clock.synchronize):
        torch.mm(a, b).add(a)  # two ops: aten::mm, aten::add
    assert clock.events == ["wait", "clock", "wait", "clock"] * 2
    clock.events.clear()
    with profile_module._OpRecorder(measure=False, synchronize=clock.synchronize):  # modelled: no waits
        torch.mm(a, b)
    assert clock.events == ["clock", "clock"]


def test_each_timed_run_is_bracketed_by_device_waits(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(profile_module, "_time", clock)
    profile_module._median_seconds(lambda: clock.events.append("run"), clock.synchronize, repeats=2)
    assert clock.events == ["run"] + ["wait", "clock", "run", "wait", "clock"] * 2
    clock.events.clear()
    profile_module._median_seconds(lambda: clock.events.append("run"), repeats=2)  # CPU: unchanged
    assert clock.events == ["run"] + ["clock", "run", "clock"] * 2


def test_profile_synchronises_its_timings_when_the_chain_is_on_cuda(monkeypatch):
    """profile() hands the synchronizer of the chain's CUDA devices to every timed op and run; on
    the CPU (no CUDA devices) there is none and torch.cuda.synchronize is never called."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: pytest.fail("synchronised on the CPU"))
    blocks = [Block() for _ in range(2)]
    me.plan.profile(blocks, torch.randn(8, WIDTH))

    waits = []
    asked = []

    def counting_synchronizer(devices):
        asked.append(list(devices))
        return lambda: waits.append(1)

    monkeypatch.setattr(profile_module, "synchronizer", counting_synchronizer)
    me.plan.profile(blocks, torch.randn(8, WIDTH))
    assert asked == [[]]
    # Each block: its recorded forward's ops, then 2 timed runs (forward; forward and backward)
    # of a warm-up plus 3 repeats, two waits per op and per repeat.
    assert len(waits) >= 2 * len(blocks) * (4 + 3 + 3)


def test_segment_with_a_percentage_keeps_that_share_of_the_blocks_activations():
    """me.segment(budget="50%") means what Engine(budget="50%") and `plan --budget 50%` mean: half of the blocks'
    activations without recomputation kept; "100%" keeps every block."""
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*(Block() for _ in range(4)))
    x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))
    everything = me.segment(blocks, budget="100%", sample=x)
    assert all(s.policy == "keep" for s in everything.plan)
    full = me.plan.simulate(everything.chain, everything.plan)["peak_bytes"]
    everything.remove()
    half = me.segment(blocks, budget="50%", sample=x)
    assert any(s.policy != "keep" for s in half.plan)
    assert me.plan.simulate(half.chain, half.plan)["peak_bytes"] <= full // 2
    half.remove()
    with pytest.raises(ValueError, match="percentage"):
        me.segment(blocks, budget="0%", sample=x)
