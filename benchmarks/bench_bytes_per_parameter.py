"""Persistent memory per parameter: memengine's Engine against the usual fp32-master recipes.

Each recipe trains the bf16 (or fp32) GPT fixture (memengine.models.GPT) for one AdamW step on
CPU; then every tensor reachable from what the training loop keeps (the model, the Engine or the
optimizer and masters) is collected, storages are deduplicated by data pointer, and their bytes
are summed by role. Nothing is assumed about sizes: the table is what the tensors hold.
  memengine            Engine: bf16 parameters, the fp32 GradBuffer (slices padded to 64 elements),
                       fp32 masters (MasterOptimizer), AdamW state
  fp32                 plain PyTorch: fp32 parameters, fp32 .grad, AdamW state
  bf16 + fp32 masters  plain PyTorch: bf16 parameters and .grad, fp32 master copies stepped by
                       AdamW (each master's fp32 gradient is made from .grad just for the step)
Bytes are counted right after the optimizer step, before the next zero_grad, i.e. with the
gradients of plain PyTorch still allocated (their steady-state size during a step).

  python benchmarks/bench_bytes_per_parameter.py [--sizes 2x64 2x96 4x256]   (LAYERSxWIDTH)
"""

import argparse
import csv
import functools
import gc
import os
import sys
import types

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a source checkout
import _common  # noqa: E402

import memengine as me  # noqa: E402
from memengine.models import GPT  # noqa: E402

ROLES = ("parameters", "gradients", "masters", "optimizer state", "other")
VOCAB, LENGTH, HEADS = 512, 64, 4
_STOP = (type, types.ModuleType, types.BuiltinFunctionType, types.CodeType, types.FrameType, str, bytes)


def _referents(obj):
    """What `obj` keeps alive, for the walk below. Types, modules and functions' globals are not
    followed (they reach the whole interpreter); closures, tensor attributes and .grad are."""
    if isinstance(obj, _STOP):
        return []
    if isinstance(obj, types.FunctionType):
        return [cell.cell_contents for cell in obj.__closure__ or () if cell.cell_contents is not None] + list(
            obj.__defaults__ or ()
        )
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, torch.Tensor):
        grad = obj.grad if obj.is_leaf else None
        return [grad, *getattr(obj, "__dict__", {}).values()]
    return gc.get_referents(obj)


def reachable_storages(*roots):
    """{(device, data pointer): bytes} of every tensor storage reachable from `roots`."""
    storages, seen, stack = {}, set(), list(roots)
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.nbytes():
                storages[(obj.device, storage.data_ptr())] = storage.nbytes()
        stack.extend(_referents(obj))
    return storages


def storage_keys(tensors):
    return {(t.device, t.untyped_storage().data_ptr()) for t in tensors if t is not None}


def bytes_by_role(roots, roles):
    """Sums the reachable storages by role; `roles` maps a role to the tensors that play it (first match wins)."""
    keys_by_role = {role: storage_keys(tensors) for role, tensors in roles.items()}
    totals = dict.fromkeys(ROLES, 0)
    for key, nbytes in reachable_storages(*roots).items():
        role = next((role for role, keys in keys_by_role.items() if key in keys), "other")
        totals[role] += nbytes
    return totals


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
    return loss, tokens[:, 1:].numel()


def optimizer_state_tensors(optimizer):
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def memengine_recipe(model, tokens):
    engine = me.Engine(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3), micro_batch_size=2)
    engine.step(tokens, loss_fn)
    roles = {
        "parameters": list(model.parameters()),
        "gradients": [engine.buffer.data],
        "masters": [engine.optimizer.master_data],
        "optimizer state": optimizer_state_tensors(engine.optimizer),
    }
    return [engine], roles


def fp32_recipe(model, tokens):
    model.float()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, count = loss_fn(model, tokens)
    (loss / count).backward()
    optimizer.step()
    roles = {
        "parameters": list(model.parameters()),
        "gradients": [p.grad for p in model.parameters()],
        "optimizer state": optimizer_state_tensors(optimizer),
    }
    return [model, optimizer], roles


def bf16_fp32_masters_recipe(model, tokens):
    params = list(model.parameters())
    masters = [p.detach().float().requires_grad_() for p in params]
    optimizer = torch.optim.AdamW(masters, lr=1e-3)
    loss, count = loss_fn(model, tokens)
    (loss / count).backward()
    for param, master in zip(params, masters, strict=True):
        master.grad = param.grad.float()
    optimizer.step()
    for param, master in zip(params, masters, strict=True):
        master.grad = None
        param.data.copy_(master)
    roles = {
        "parameters": params,
        "gradients": [p.grad for p in params],
        "masters": masters,
        "optimizer state": optimizer_state_tensors(optimizer),
    }
    return [model, optimizer, masters], roles


RECIPES = {
    "memengine": (memengine_recipe, torch.bfloat16),
    "fp32": (fp32_recipe, torch.float32),
    "bf16 + fp32 masters": (bf16_fp32_masters_recipe, torch.bfloat16),
}


def measure_recipe(name, layers, width):
    recipe, dtype = RECIPES[name]
    torch.manual_seed(0)
    model = GPT(vocab=VOCAB, width=width, layers=layers, heads=HEADS, length=LENGTH).to(dtype)
    parameters = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, VOCAB, (4, 33))
    roots, roles = recipe(model, tokens)
    del tokens
    gc.collect()
    return parameters, bytes_by_role(roots, roles)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2x64", "2x96", "4x256"], help="LAYERSxWIDTH of the GPT fixture")
    parser.add_argument("--csv", default=os.path.join(_common.ROOT, "benchmarks", "results", "bytes_per_parameter.csv"))
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        layers, width = (int(n) for n in size.split("x"))
        for name in RECIPES:
            parameters, totals = measure_recipe(name, layers, width)
            total = sum(totals.values())
            rows.append(
                dict(recipe=name, layers=layers, width=width, parameter_count=parameters, **totals, total=total)
            )

    print(f"torch {torch.__version__}, git {_common.git_sha()}; bytes per parameter, after one AdamW step")
    header = ["model", "parameter count", "recipe", *ROLES, "total", "total bytes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        per_parameter = [f"{row[role] / row['parameter_count']:.3f}" for role in (*ROLES, "total")]
        model = f"{row['layers']}x{row['width']}"
        print(
            f"| {model} | {row['parameter_count']:,} | {row['recipe']} | "
            + " | ".join(per_parameter)
            + f" | {row['total']:,} |"
        )

    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    new_file = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], "torch", "git_sha"])
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**row, "torch": torch.__version__, "git_sha": _common.git_sha()})


if __name__ == "__main__":
    main()
