"""me.checkpoint against the behaviours PyTorch's own non-reentrant checkpoint tests check
(test/test_utils.py TestCheckpoint, the checkpoint tests of test/test_autograd.py and its
TestNestedCheckpoint), written for memengine: torch's keywords with torch's meaning, detection of a
recomputation that differs from the forward, early stop on and off, saved-tensor identity,
differentiating inside the checkpointed function (nested and double backward), autocast and RNG
replay, detached and non-tensor inputs and outputs, context_fn (and selective checkpointing through
it) and checkpoint_sequential. Gradients are compared with the same computation without
checkpointing: bit-identical, since the arithmetic is the same."""

import contextlib
import functools

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

import memengine as me

EARLY_STOP = pytest.mark.parametrize("early_stop", [True, False], ids=["early_stop", "no_early_stop"])


def changes_on_recomputation(forward_fn, recompute_fn):
    """A function that runs forward_fn the first time and recompute_fn every time after."""
    calls = [0]

    def fn(*args):
        calls[0] += 1
        return (forward_fn if calls[0] == 1 else recompute_fn)(*args)

    return fn


def assert_all_equal(expected, actual):
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual, strict=True):
        assert torch.equal(a, b), (a, b)


# --- torch's keywords ---------------------------------------------------------------------------


def test_torch_keywords_are_accepted_not_passed_to_fn():
    weight = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(3, 4, requires_grad=True)

    def fn(x, *, scale):  # any unexpected keyword would raise TypeError here
        return (torch.tanh(x @ weight) * scale).sum()

    expected = torch.autograd.grad(fn(x, scale=2.0), [x, weight])
    loss = me.checkpoint(
        fn,
        x,
        scale=2.0,
        use_reentrant=False,
        preserve_rng_state=True,
        determinism_check="default",
        debug=False,
        early_stop=True,
        context_fn=torch_checkpoint.noop_context_fn,
    )
    assert_all_equal(expected, torch.autograd.grad(loss, [x, weight]))


def test_reentrant_and_unknown_determinism_checks_are_refused_clearly():
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match="use_reentrant=True is not supported.*use_reentrant=False"):
        me.checkpoint(torch.sin, x, use_reentrant=True)
    with pytest.raises(ValueError, match="determinism_check.*'default'.*'none'"):
        me.checkpoint(torch.sin, x, use_reentrant=False, determinism_check="values")


# --- a recomputation that differs from the forward ---------------------------------------------


def test_recomputed_tensor_of_another_shape_raises_instead_of_a_wrong_gradient():
    scale = torch.randn(4)

    def forward(x):
        return (x * scale).sum()  # MulBackward saves `scale`, shape (4,)

    def recompute(x):
        return (x * scale[:1]).sum()  # the same op, but it saves a (1,) tensor: broadcasting hides it

    x = torch.randn(4, requires_grad=True)
    loss = me.checkpoint(changes_on_recomputation(forward, recompute), x, use_reentrant=False)
    with pytest.raises(me.CheckpointError, match="different metadata.*tensor 0.*\\(4,\\).*\\(1,\\)"):
        loss.backward()
    # determinism_check="none" switches the check off, as in torch
    loss = me.checkpoint(changes_on_recomputation(forward, recompute), x, determinism_check="none")
    loss.backward()


def test_fewer_tensors_saved_by_the_recomputation_raise():
    def three(x):
        return x.sin().exp().sin()

    def two(x):
        return x.sin().exp()

    x = torch.randn(3, requires_grad=True)
    loss = me.checkpoint(changes_on_recomputation(three, two), x, use_reentrant=False)
    with pytest.raises(me.CheckpointError, match="different number of tensors"):
        loss.sum().backward()


def test_more_tensors_saved_by_the_recomputation_raise_only_without_early_stop():
    def two(x):
        return x.sin().exp()

    def three(x):
        return x.sin().exp().sin()

    x = torch.randn(3, requires_grad=True)
    with torch_checkpoint.set_checkpoint_early_stop(False):
        loss = me.checkpoint(changes_on_recomputation(two, three), x, use_reentrant=False)
    with pytest.raises(me.CheckpointError, match="more tensors during recomputation"):
        loss.sum().backward()
    # with early stop the recomputation ends once the two saved tensors are back: the gradient is right
    loss = me.checkpoint(changes_on_recomputation(two, three), x, use_reentrant=False)
    assert_all_equal(torch.autograd.grad(two(x).sum(), [x]), torch.autograd.grad(loss.sum(), [x]))


def test_debug_compares_values_as_well():
    calls = [0]

    def drifting(x):
        calls[0] += 1
        return (x * calls[0]).exp().sum()

    x = torch.randn(3, requires_grad=True)
    with pytest.raises(me.CheckpointError, match="differs from the forward's"):
        me.checkpoint(drifting, x, use_reentrant=False, debug=True).backward()
    calls[0] = 0
    with torch_checkpoint.set_checkpoint_debug_enabled(True):  # torch's global switch too
        loss = me.checkpoint(drifting, x, use_reentrant=False)
    with pytest.raises(me.CheckpointError, match="differs from the forward's"):
        loss.backward()


# --- early stop ------------------------------------------------------------------------------------


def test_early_stop_keyword_and_torch_switch():
    """fn's trailing clone saves nothing: an early-stopped recomputation never reaches it."""
    clones = [0]

    def clone(x):
        clones[0] += 1
        return x.clone()

    def fn(x):
        return clone(x.sin().cos())

    def clone_runs(**kwargs):
        clones[0] = 0
        x = torch.tensor(1.0, requires_grad=True)
        me.checkpoint(fn, x, use_reentrant=False, **kwargs).backward()
        return clones[0]

    assert clone_runs() == 1
    assert clone_runs(early_stop=False) == 2
    with torch_checkpoint.set_checkpoint_early_stop(False):
        assert clone_runs() == 2
        assert clone_runs(early_stop=True) == 2  # the switch wins over the keyword, as in torch
    with torch_checkpoint.set_checkpoint_early_stop(True):
        assert clone_runs(early_stop=False) == 1


def test_recomputation_stops_before_the_backend_when_only_the_input_is_saved():
    class SinCounter(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten.sin.default
            return func(*args, **(kwargs or {}))

    for early_stop, sines in ((True, 1), (False, 2)):
        x = torch.tensor(1.0, requires_grad=True)
        with SinCounter() as counter:
            me.checkpoint(torch.sin, x, use_reentrant=False, early_stop=early_stop).backward()
        assert counter.count == sines


# --- saved tensors ----------------------------------------------------------------------------------


def test_saved_tensor_that_does_not_require_grad_keeps_its_identity():
    seen = []

    class SavesSecond(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, y):
            ctx.save_for_backward(y)
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(ctx.saved_tensors[0])
            return grad, None

    a = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(2.0)
    me.checkpoint(SavesSecond.apply, a, b, use_reentrant=False).backward()
    assert seen[0] is b


def test_saved_tensors_read_outside_backward_and_twice_recompute():
    """A deliberate difference: torch raises on a second ctx.saved_tensors in one backward;
    memengine recomputes what was asked again."""
    runs = [0]

    def fn(x):
        runs[0] += 1
        return (x * x).exp()

    x = torch.randn(5, requires_grad=True)
    y = me.checkpoint(fn, x, use_reentrant=False)
    expected = (x * x).exp().detach()
    first = y.grad_fn._saved_result  # outside a backward: recomputes
    second = y.grad_fn._saved_result  # and again
    assert runs[0] == 3 and torch.equal(first, expected) and torch.equal(second, expected)
    y.sum().backward()
    assert runs[0] == 4


@pytest.mark.skipif(
    not hasattr(torch_checkpoint, "GraphExecGroup"), reason="torch.utils.checkpoint.GraphExecGroup needs torch >= 2.14"
)
def test_graph_execution_group_shares_one_recomputation():
    runs = [0]

    def fn(x):
        runs[0] += 1
        y = x.sin().cos()
        return y, y.sin().cos()

    for group, expected_runs in ((torch_checkpoint.GraphExecGroup(), 2), (contextlib.nullcontext(), 3)):
        runs[0] = 0
        x = torch.randn(3, 3, requires_grad=True)
        y, z = me.checkpoint(fn, x, use_reentrant=False)
        with group:
            (grad_y,) = torch.autograd.grad(z, (y,), torch.ones(3, 3))
            torch.autograd.grad(y, (x,), grad_y)
        assert runs[0] == expected_runs


def test_parameter_used_inside_and_outside_gets_one_gradient_hook_call():
    weight = torch.randn(4, 4, requires_grad=True)
    calls = []
    weight.register_hook(calls.append)
    x = torch.rand(4, 4, requires_grad=True)
    me.checkpoint(lambda h: weight * h, weight * x, use_reentrant=False).sum().backward()
    assert len(calls) == 1


# --- differentiating inside the checkpointed function ------------------------------------------------


def input_gradient(fn):
    def wrapper(x):
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(fn(x), (x,), create_graph=True)
        return grad

    return wrapper


def summed(fn):
    return lambda x: fn(x).sum()


def checkpointed(fn):
    return lambda *args, **kwargs: me.checkpoint(fn, *args, use_reentrant=False, **kwargs)


@EARLY_STOP
def test_gradient_penalty_inside_a_checkpoint(early_stop):
    """fn itself calls torch.autograd.grad (a gradient penalty): the gradient is right."""
    weight = torch.randn(4, 4, requires_grad=True)

    def penalised(x):
        y = torch.tanh(x @ weight)
        (grad_x,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        return y.square().sum() + grad_x.square().sum()

    x = torch.randn(3, 4, requires_grad=True)
    expected = torch.autograd.grad(penalised(x), [x, weight])
    with torch_checkpoint.set_checkpoint_early_stop(early_stop):
        loss = me.checkpoint(penalised, x, use_reentrant=False)
    assert_all_equal(expected, torch.autograd.grad(loss, [x, weight]))


@EARLY_STOP
def test_nested_checkpoints_and_higher_order_gradients(early_stop):
    grad, c = input_gradient, checkpointed

    def f(x):
        return x.sin().exp().sin()

    def g(x):  # differentiates twice inside, returns something else
        a = x.sin().exp().sin()
        b = x.sin().exp().sin()
        torch.autograd.grad(a, x)
        torch.autograd.grad(b, x)
        return x.sin()

    x = torch.randn((), requires_grad=True)
    with torch_checkpoint.set_checkpoint_early_stop(early_stop):
        for fn in (f, g):
            cases = (
                (fn, (c(fn), c(c(fn)))),
                (grad(fn), (grad(c(fn)), grad(c(c(fn))))),
                (grad(grad(fn)), (grad(c(grad(fn))), c(grad(grad(c(fn)))), grad(c(grad(c(fn)))))),
                (grad(grad(grad(fn))), (grad(c(grad(grad(c(fn))))), grad(c(grad(c(grad(c(fn)))))))),
            )
            for expected_fn, actual_fns in cases:
                expected = expected_fn(x)
                for actual_fn in actual_fns:
                    assert torch.equal(expected, actual_fn(x))


@EARLY_STOP
def test_nested_checkpoint_two_children(early_stop):
    grad, c = input_gradient, checkpointed

    def f(x):
        return x.sin().exp().sin()

    def g(x):
        return x.cos().sin().exp()

    def both(x):
        return c(g)(c(f)(x))

    a = torch.randn(3, 3, requires_grad=True)
    with torch_checkpoint.set_checkpoint_early_stop(early_stop):
        expected = grad(summed(grad(summed(lambda x: g(f(x))))))(a)
        assert torch.equal(expected, grad(summed(grad(summed(c(both)))))(a))
        assert torch.equal(expected, grad(summed(c(grad(summed(c(both))))))(a))


def test_reentrant_backward_from_a_hook_inside_the_checkpointed_graph():
    def fn(a):
        x = a.sin().cos()
        return x, x.sin()

    def input_gradient_with(checkpointing):
        a = torch.tensor(1.0, requires_grad=True)
        x, out = me.checkpoint(fn, a, use_reentrant=False) if checkpointing else fn(a)
        out.grad_fn.register_hook(lambda *_: x.backward(retain_graph=True))  # a backward inside a backward
        out.backward(retain_graph=True)
        return a.grad

    assert torch.equal(input_gradient_with(False), input_gradient_with(True))


# --- inputs and outputs -------------------------------------------------------------------------------


@EARLY_STOP
def test_non_tensor_and_keyword_inputs_and_outputs(early_stop):
    def fn(k, a, b, f, blah=None):
        out = f(k * a * b.exp())
        if blah is not None:
            out = out * blah
        return out, 1, "abcd", None

    a, b, blah = (torch.tensor(v, requires_grad=True) for v in (2.0, 3.0, 0.5))
    with torch_checkpoint.set_checkpoint_early_stop(early_stop):
        out, one, text, nothing = me.checkpoint(fn, 3, a, b, torch.sin, blah=blah, use_reentrant=False)
    assert (one, text, nothing) == (1, "abcd", None)
    expected = torch.autograd.grad(fn(3, a, b, torch.sin, blah=blah)[0], (a, b, blah))
    assert_all_equal(expected, torch.autograd.grad(out, (a, b, blah)))


def test_dict_input_and_output():
    layer = torch.nn.Linear(5, 5, bias=False)
    inputs = {"tensor": torch.randn(5, 5)}
    expected = layer(inputs["tensor"]).sum()
    actual = me.checkpoint(lambda d: {"result": layer(d["tensor"])}, inputs, use_reentrant=False)["result"].sum()
    assert torch.equal(expected, actual)
    assert_all_equal(torch.autograd.grad(expected, [layer.weight]), torch.autograd.grad(actual, [layer.weight]))


def test_output_computed_without_grad_inside_the_checkpoint():
    class NoGrad(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2, bias=False)

        def forward(self, x):
            with torch.no_grad():
                return self.linear(x)

    module, a = NoGrad(), torch.randn(2, 2, requires_grad=True)
    for _ in range(3):
        out = me.checkpoint(module, a, use_reentrant=False)
        assert not out.requires_grad
        out += a
        out.sum().backward()
    assert torch.equal(a.grad, torch.full((2, 2), 3.0))


# --- replayed state ---------------------------------------------------------------------------------------


def test_replayed_rng_state_does_not_leak_to_the_caller():
    dropout = torch.nn.Dropout(0.5)
    x = torch.randn(1000, requires_grad=True)

    def fn(x):
        return dropout(x).sin().exp()  # exp's result is saved last: early stop ends after the dropout

    torch.manual_seed(0)
    loss = me.checkpoint(fn, x, use_reentrant=False).sum()
    torch.rand(7)  # the caller draws between forward and backward: the replay must not rewind it
    before_backward = torch.get_rng_state()
    loss.backward()  # replays the dropout from the state the forward started with
    assert torch.equal(torch.get_rng_state(), before_backward)
    torch.manual_seed(0)
    expected = torch.autograd.grad(fn(x).sum(), [x])
    assert_all_equal(expected, [x.grad])


@pytest.mark.parametrize("enabled", [True, False])
def test_autocast_state_is_replayed_when_backward_runs_outside_it(enabled):
    dtypes = []

    def fn(x, y, z):
        x = torch.mm(x, y)
        z = torch.mm(torch.mm(x, z), z)
        dtypes.append(z.dtype)
        return z

    inputs = [torch.randn(3, 3, requires_grad=True) for _ in range(3)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
        expected_loss = fn(*inputs).float().sum()
        # early_stop=False: the recomputation runs to the end, where fn records its dtype
        loss = me.checkpoint(fn, *inputs, use_reentrant=False, early_stop=False).float().sum()
    expected = torch.autograd.grad(expected_loss, inputs)
    actual = torch.autograd.grad(loss, inputs)  # the recomputation runs outside the autocast block
    assert dtypes == [torch.bfloat16 if enabled else torch.float32] * 3
    assert_all_equal(expected, actual)


# --- context_fn, selective checkpointing, checkpoint_sequential ----------------------------------------


class OperatorLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operators = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operators.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_context_fn_contexts_wrap_forward_and_recomputation():
    x = torch.tensor(1.0, requires_grad=True)
    log = OperatorLog()
    me.checkpoint(torch.exp, x, use_reentrant=False, context_fn=lambda: (log, contextlib.nullcontext()))
    assert log.operators == ["exp.default"]
    log = OperatorLog()
    out = me.checkpoint(torch.exp, x, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), log))
    assert log.operators == []
    out.backward()
    assert log.operators[0] == "exp.default"


def test_selective_checkpointing_through_context_fn():
    runs = [0]

    def policy(ctx, op, *args, **kwargs):
        if op is torch.ops.aten.mm.default:
            runs[0] += not ctx.is_recompute
            return torch_checkpoint.CheckpointPolicy.MUST_SAVE
        return torch_checkpoint.CheckpointPolicy.PREFER_RECOMPUTE

    def fn(x, y):
        return torch.mm(x.cos(), y).sin().sum()

    x, y = torch.randn(8, 8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    context_fn = functools.partial(torch_checkpoint.create_selective_checkpoint_contexts, policy)
    loss = me.checkpoint(fn, x, y, use_reentrant=False, context_fn=context_fn)
    assert_all_equal(torch.autograd.grad(fn(x, y), (x, y)), torch.autograd.grad(loss, (x, y)))
    assert runs[0] == 1


def test_checkpoint_sequential_runs_on_me_checkpoint(monkeypatch):
    """torch's checkpoint_sequential calls torch.utils.checkpoint.checkpoint with its keywords
    (use_reentrant, preserve_rng_state): with me.checkpoint in its place it is unchanged."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return me.checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch_checkpoint, "checkpoint", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(20, 10), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(10, 5), torch.nn.ReLU()
    )
    x = torch.randn(4, 20, requires_grad=True)
    torch.manual_seed(1)
    expected = torch.autograd.grad(model(x).sum(), [x, *model.parameters()])
    torch.manual_seed(1)
    out = torch_checkpoint.checkpoint_sequential(model, 2, x, use_reentrant=False)
    assert_all_equal(expected, torch.autograd.grad(out.sum(), [x, *model.parameters()]))
    assert calls and all(call.get("use_reentrant") is False for call in calls)


def test_inside_torch_compile_gives_the_eager_gradient():
    """A compiled caller: the checkpointed function runs eagerly (its saves must match the eager
    recomputation), dropout included; the gradient equals plain PyTorch's with the same RNG state."""
    torch.manual_seed(0)
    linear, dropout = torch.nn.Linear(16, 16), torch.nn.Dropout(0.3)
    x = torch.randn(4, 16, requires_grad=True)

    def fn(x):
        return torch.sin(dropout(linear(x))).sum()

    torch.manual_seed(1)
    expected = torch.autograd.grad(fn(x), [x, linear.weight])
    torch.manual_seed(1)
    compiled = torch.compile(lambda x: me.checkpoint(fn, x, use_reentrant=False))
    assert_all_equal(expected, torch.autograd.grad(compiled(x), [x, linear.weight]))
