"""MasterOptimizer is a torch.optim.Optimizer: schedulers, param_groups, hooks, closures and
state_dict behave as with the optimizer it wraps.

fp32 parameters are their own masters and their .grad is the GradBuffer view holding exactly the
gradient autograd produced (the first contribution of a window is copied, not added), so on an
fp32 model every result must equal plain PyTorch bit for bit."""

import copy
import functools
import io

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import memengine as me


def make_model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def make_inputs(step, dtype=torch.float32):
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(5, 8, generator=generator).to(dtype)


def backward(model, step):
    model(make_inputs(step, next(model.parameters()).dtype)).float().square().mean().backward()


def copy_of(model):
    twin = make_model(next(model.parameters()).dtype)
    twin.load_state_dict(model.state_dict())
    return twin


def master_optimizer(model, optimizer_cls=torch.optim.AdamW, **kwargs):
    return me.MasterOptimizer(optimizer_cls, me.GradBuffer(model), **kwargs)


def assert_same_parameters(model, reference):
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name


SCHEDULERS = {
    "StepLR": lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5),
    "LambdaLR": lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step)),
    # cycles AdamW's betas too: those must reach the wrapped optimizer as well
    "OneCycleLR": lambda optimizer: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=6),
}


@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_lr_schedulers_drive_the_wrapped_optimizer_like_plain_adamw(scheduler_name):
    reference = make_model()
    model = copy_of(reference)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    optimizer = master_optimizer(model, lr=1e-2)
    assert isinstance(optimizer, torch.optim.Optimizer)
    reference_scheduler = SCHEDULERS[scheduler_name](reference_optimizer)
    scheduler = SCHEDULERS[scheduler_name](optimizer)
    for step in range(6):
        for net, opt, sched in ((reference, reference_optimizer, reference_scheduler), (model, optimizer, scheduler)):
            opt.zero_grad()
            backward(net, step)
            opt.step()
            sched.step()
        assert scheduler.get_last_lr() == reference_scheduler.get_last_lr()
        assert optimizer.optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]
        assert optimizer.optimizer.param_groups[0]["betas"] == reference_optimizer.param_groups[0]["betas"]
        assert_same_parameters(model, reference)


def test_param_groups_state_and_defaults_are_the_wrapped_optimizers():
    optimizer = master_optimizer(make_model(), lr=1e-3)
    inner = optimizer.optimizer
    assert optimizer.param_groups is inner.param_groups
    assert optimizer.defaults is inner.defaults
    optimizer.param_groups[0]["lr"] = 0.25
    assert inner.param_groups[0]["lr"] == 0.25
    optimizer.load_state_dict(optimizer.state_dict())  # torch's load rebuilds the groups and the state
    assert optimizer.param_groups is inner.param_groups and optimizer.state is inner.state
    assert inner.param_groups[0]["lr"] == 0.25


def test_param_group_dicts_give_per_group_options_like_plain_adamw():
    reference = make_model()
    model = copy_of(reference)

    def groups(net):
        decay = [p for p in net.parameters() if p.ndim == 2]
        return [{"params": decay, "weight_decay": 0.5}, {"params": [p for p in net.parameters() if p.ndim == 1]}]

    reference_optimizer = torch.optim.AdamW(groups(reference), lr=1e-2, weight_decay=0.0)
    optimizer = master_optimizer(model, lr=1e-2, weight_decay=0.0, param_groups=groups(model))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]
    for step in range(3):
        for net, opt in ((reference, reference_optimizer), (model, optimizer)):
            opt.zero_grad()
            backward(net, step)
            opt.step()
    assert_same_parameters(model, reference)


def test_param_group_dicts_must_cover_the_buffer_once():
    def refused(groups_of):
        model = make_model()  # a fresh one each time: the GradBuffer stays attached to the model
        weights, biases = [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]
        with pytest.raises(ValueError) as error:
            master_optimizer(model, param_groups=groups_of(weights, biases))
        return str(error.value)

    assert "not in any param group" in refused(lambda weights, biases: [{"params": weights}])
    assert "more than one param group" in refused(lambda w, b: [{"params": w + b}, {"params": b}])
    assert "not covered by the GradBuffer" in refused(
        lambda w, b: [{"params": w + b + [torch.nn.Parameter(torch.ones(2))]}]
    )


def test_add_param_group_is_refused_with_the_fix():
    optimizer = master_optimizer(make_model())
    with pytest.raises(RuntimeError, match="add_param_group.*param_groups="):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})


def test_step_hooks_registered_on_the_master_optimizer_fire_once_per_step():
    model = make_model()
    optimizer = master_optimizer(model, lr=1e-2)
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt)))
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt)))
    global_handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append(("global", opt)))
    try:
        backward(model, 0)
        optimizer.step()
    finally:
        global_handle.remove()
    assert calls == [("pre", optimizer), ("post", optimizer), ("global", optimizer)]


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.LBFGS])
def test_step_with_a_closure_matches_pytorch(optimizer_cls):
    reference = make_model()
    model = copy_of(reference)
    kwargs = {"lr": 0.1} if optimizer_cls is torch.optim.SGD else {"lr": 0.5, "max_iter": 4}
    reference_optimizer = optimizer_cls(reference.parameters(), **kwargs)
    optimizer = master_optimizer(model, optimizer_cls, **kwargs)
    for step in range(2):
        losses = []
        for net, opt in ((reference, reference_optimizer), (model, optimizer)):

            def closure(net=net, opt=opt, step=step):
                opt.zero_grad()
                loss = net(make_inputs(step)).square().mean()
                loss.backward()
                return loss

            losses.append(opt.step(closure))
        assert torch.equal(*losses)
    assert_same_parameters(model, reference)


def test_closure_re_evaluations_see_the_updated_low_precision_model():
    # LBFGS evaluates the closure again after moving the masters: the bf16 model must follow.
    model = make_model(torch.bfloat16)
    optimizer = master_optimizer(model, torch.optim.LBFGS, lr=0.5, max_iter=3)
    seen = []

    def closure():
        optimizer.zero_grad()
        seen.append([p.detach().clone() for p in model.parameters()])
        loss = model(make_inputs(0, torch.bfloat16)).float().square().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert len(seen) == 3
    assert not all(torch.equal(a, b) for a, b in zip(seen[0], seen[1], strict=True))
    for p, master in optimizer.masters:
        assert torch.equal(p, master.to(p.dtype))


def train(model, optimizer, steps, first_step=0, scheduler=None):
    for step in range(first_step, first_step + steps):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_bit_identically(dtype):
    model = make_model(dtype)
    optimizer = master_optimizer(model, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    train(model, optimizer, 3, scheduler=scheduler)
    file = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr": scheduler.state_dict()}, file)
    assert set(optimizer.state_dict()) >= {"state", "param_groups"}  # torch's format, for torch's tools
    if dtype != torch.float32:
        # The masters carry bits the bf16 model does not have: they must be saved.
        masters = torch.cat([m.detach().flatten() for p, m in optimizer.masters])
        assert not torch.equal(masters, masters.to(dtype).float())
    file.seek(0)
    saved = torch.load(file)

    resumed = make_model(dtype, seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_optimizer = master_optimizer(resumed, lr=1e-2)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    for (_, master), (_, resumed_master) in zip(optimizer.masters, resumed_optimizer.masters, strict=True):
        assert torch.equal(master, resumed_master)
    resumed_scheduler = torch.optim.lr_scheduler.StepLR(resumed_optimizer, step_size=1, gamma=0.9)
    resumed_scheduler.load_state_dict(saved["lr"])
    train(model, optimizer, 2, first_step=3, scheduler=scheduler)
    train(resumed, resumed_optimizer, 2, first_step=3, scheduler=resumed_scheduler)
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()
    assert_same_parameters(resumed, model)
    for (_, master), (_, resumed_master) in zip(optimizer.masters, resumed_optimizer.masters, strict=True):
        assert torch.equal(master, resumed_master)


def test_loading_a_state_dict_without_the_masters_a_bf16_model_needs_is_refused():
    fp32_state = master_optimizer(make_model(), lr=1e-2).state_dict()
    optimizer = master_optimizer(make_model(torch.bfloat16), lr=1e-2)
    with pytest.raises(ValueError, match="master weights"):
        optimizer.load_state_dict(fp32_state)


def test_factory_that_returns_no_optimizer_is_refused():
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        me.MasterOptimizer(functools.partial(list), me.GradBuffer(make_model()))


def test_a_plain_torch_optimizer_checkpoint_loads_with_the_same_parameter_order():
    # torch's state dicts index parameters by position: the groups list them in model order.
    reference = make_model()
    model = copy_of(reference)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    train(reference, reference_optimizer, 2)
    model.load_state_dict(reference.state_dict())
    optimizer = master_optimizer(model, lr=1e-2)
    # deepcopy as a save and load would: torch's load shares the "step" tensors with the source
    optimizer.load_state_dict(copy.deepcopy(reference_optimizer.state_dict()))
    for net, opt in ((reference, reference_optimizer), (model, optimizer)):
        opt.zero_grad()
        backward(net, 5)
        opt.step()
    assert_same_parameters(model, reference)
