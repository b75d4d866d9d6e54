"""Gradient accumulation over many micro-batches, measured: memengine's Engine against the ways
people accumulate in plain PyTorch, on a bf16 GPT-style model (the benchmark
benchmarks/bench_grad_accumulation.py and the tests run it at different sizes).

Accuracy: the accumulated, token-normalised gradient of one step (all micro-batches), compared
with an fp64 oracle computed from the same bf16 weights and the same data; the number is
||g - g64|| / ||g64|| over all parameters. Methods:
  pytorch-bf16        PyTorch's default: bf16 .grad accumulated by autograd across micro-batches
  pytorch-fp32-master after each micro-batch, p.grad (bf16) is added into an fp32 buffer and freed
  pytorch-fp32-master-zeroed  the same, but .grad zeroed in place (zero_grad(set_to_none=False))
  memengine           memengine.Engine (fused Linear wgrad into fp32, other grads folded at once)
Memory: the allocator's peak during one step (memengine.segments.allocator_peak); persistent
buffers allocated before the step are excluded.
"""

import functools

import torch
import torch.nn.functional as F

import memengine as me
from memengine.models import GPT
from memengine.segments.allocator_peak import peak_extra_bytes


def summed_loss(model, tokens):
    """Next-token loss summed over the micro-batch, and its token count."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
    return loss, tokens[:, 1:].numel()


def make_models(config, seed=0):
    """The bf16 model and an fp64 copy holding exactly the same (bf16) values."""
    torch.manual_seed(seed)
    model = GPT(**config).to(torch.bfloat16)
    oracle = GPT(**config).to(torch.float64)
    oracle.load_state_dict({k: v.to(torch.float64) for k, v in model.state_dict().items()})
    return model, oracle


def make_data(config, micro_batches, rows, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config["vocab"], (micro_batches * rows, config["length"] + 1), generator=generator)


def flat(grads):
    return torch.cat([g.reshape(-1).to(torch.float64) for g in grads])


def oracle_gradient(oracle, data, rows):
    oracle.zero_grad()
    total = data[:, 1:].numel()
    for micro_batch in data.split(rows):
        loss, _ = summed_loss(oracle, micro_batch)
        (loss / total).backward()
    return flat(p.grad for p in oracle.parameters())


def pytorch_bf16_step(model, data, rows):
    model.zero_grad()
    total = data[:, 1:].numel()
    for micro_batch in data.split(rows):
        loss, _ = summed_loss(model, micro_batch)
        (loss / total).backward()  # autograd accumulates into the bf16 .grad
    return [p.grad for p in model.parameters()]


def pytorch_fp32_master_step(model, data, rows, buffers, free_grads):
    """After each micro-batch, fp32 buffer += bf16 .grad; then .grad is freed (free_grads) or
    zeroed in place (zero_grad(set_to_none=False), which keeps one bf16 gradient set allocated)."""
    for b in buffers:
        b.zero_()
    total = data[:, 1:].numel()
    for micro_batch in data.split(rows):
        loss, _ = summed_loss(model, micro_batch)
        (loss / total).backward()
        for p, b in zip(model.parameters(), buffers, strict=True):
            b.add_(p.grad)  # fp32 += bf16
        model.zero_grad(set_to_none=free_grads)
    return buffers


def memengine_step(engine, data, rows):
    engine.step(data, summed_loss)
    return [p.main_grad for p in engine.model.parameters()]


def relative_error(grads, reference):
    return ((flat(grads) - reference).norm() / reference.norm()).item()


def run(config, micro_batches, rows, measure_memory=True):
    """Returns {method: {"relative_error": ..., "peak_bytes": ...}} and the bf16 gradient-set size."""
    model, oracle = make_models(config)
    data = make_data(config, micro_batches, rows)
    reference = oracle_gradient(oracle, data, rows)
    results = {}

    grads = pytorch_bf16_step(model, data, rows)
    results["pytorch-bf16"] = {"relative_error": relative_error(grads, reference)}
    model.zero_grad(set_to_none=True)

    buffers = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
    for name, free_grads in (("pytorch-fp32-master", True), ("pytorch-fp32-master-zeroed", False)):
        model.zero_grad(set_to_none=True)
        step = functools.partial(pytorch_fp32_master_step, model, data, rows, buffers, free_grads)
        results[name] = {"relative_error": relative_error(step(), reference)}
        if measure_memory:
            model.zero_grad(set_to_none=True)  # each measured step starts without gradients
            results[name]["peak_bytes"] = peak_extra_bytes(step, torch.device("cpu"))
    model.zero_grad(set_to_none=True)
    del buffers

    engine = me.Engine(model, optimizer=functools.partial(torch.optim.SGD, lr=0.0), micro_batch_size=rows)
    step = functools.partial(memengine_step, engine, data, rows)
    results["memengine"] = {"relative_error": relative_error(step(), reference)}
    if measure_memory:
        results["memengine"]["peak_bytes"] = peak_extra_bytes(step, torch.device("cpu"))
    engine.close()  # the model outlives this Engine: detach it before unpatching
    me.unpatch(model)
    gradient_set_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return results, gradient_set_bytes
