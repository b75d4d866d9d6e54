"""Rank functions of the ZeRO-1 and resume tests (test_zero1.py, test_resume.py), kept in a non-test module so
that spawned ranks import them under one stable name. Each returns plain data (tensors, dicts, lists) for the
test to check; a rank that raises fails the run with its traceback.

Every step's global batch has GLOBAL_ROWS rows (dp_common.global_batch: a different token count per row);
on `world` ranks, rank r takes its share, and a single-process Engine takes all of it.
"""

import copy
import functools
import os
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed import dp_common as dp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import memengine as me
from memengine.grad import GradBuffer

GLOBAL_ROWS = 8
STEPS = 5
CLIP_NORM = 0.05  # below the gradient norms of these runs (the test checks clipping was active)
WEIGHT_DECAY = 0.1
# Where results may differ in the last bits (another summation order), the runs use SGD with momentum, which
# carries a perturbation forward linearly. Adam does not: a parameter whose true gradient is zero (an attention
# key bias: softmax ignores a constant shift) gets a gradient of pure rounding noise, which Adam scales up to
# steps of about lr, so a one-ulp change of the clipping norm becomes a 3e-5 relative difference in two steps.
SGD = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY)


# -- building and training -----------------------------------------------------------------------------
def batch_for(step, rank=0, world=None):
    """The step's batch for `rank` of `world` ranks, or all of it for a single process (world None)."""
    batch = dp.global_batch(step, GLOBAL_ROWS)
    return batch if world is None else dp.rank_batch(batch, rank, world)


def decay_groups(model, weight_decay=WEIGHT_DECAY):
    """Weight decay on matrices and embeddings, none on biases and norms (the usual recipe)."""
    named = list(model.named_parameters())
    return [
        {"params": [(name, p) for name, p in named if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [(name, p) for name, p in named if p.dim() < 2], "weight_decay": 0.0},
    ]


def single_process_engine(model, optimizer=None, **options):
    """An Engine without a process group, inside a rank process (which has torch.distributed initialised);
    AdamW (dp_common.optimizer) unless another optimizer is given."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="memengine.Engine: torch.distributed is initialised")
        return me.Engine(model, optimizer or dp.optimizer(), micro_batch_size=2, **options)


def data_parallel_engine(model, shard, optimizer=None, **options):
    return me.Engine(
        model,
        optimizer or dp.optimizer(),
        micro_batch_size=2,
        process_group=dist.group.WORLD,
        shard=shard,
        **options,
    )


def train(engine, steps, rank, world, first=0, loss_fn=dp.summed_loss):
    """Steps `engine` on the batches of steps first .. first+steps-1; returns each step's grad norm."""
    return [
        float(engine.step(batch_for(step, rank, world), loss_fn)["grad_norm"]) for step in range(first, first + steps)
    ]


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


def masters(engine):
    """The fp32 master weights in the canonical layout (a collective with shard=True); an fp32 model's
    parameters, which are their own masters, flattened."""
    saved = engine.consolidated_state_dict()["optimizer"]["master_weights"]
    if saved is None:
        return torch.cat([p.detach().reshape(-1) for p in engine.model.parameters()])
    return saved.clone()


def differences(a, b, path=""):
    """Paths at which two nested state dicts differ (tensors: dtype, shape or any bit); [] when identical."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [found for key in a for found in differences(a[key], b[key], f"{path}/{key}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [found for i, (x, y) in enumerate(zip(a, b, strict=True)) for found in differences(x, y, f"{path}[{i}]")]
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return [] if same else [f"{path}: tensors differ"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def error_of(action):
    """The message of the ValueError action() raises, or a note that it raised none."""
    try:
        action()
    except ValueError as error:
        return f"ValueError: {error}"
    return "no error"


# -- ZeRO-1 against unsharded data parallelism ----------------------------------------------------------
def zero1_against_unsharded(rank, world):
    """Sharded and unsharded data parallelism on the same batches: parameters, masters and grad norms after
    STEPS steps (fp32 and bf16; AdamW without clipping, SGD with clipping); the same with weight-decay param
    groups, and a single-process Engine with those groups; a zero-gradient step that only weight decay
    moves; the optimizer memory of each; refusals of optimizers ZeRO-1 cannot step."""
    results = {"runs": {}}
    for dtype in (torch.float32, torch.bfloat16):
        for max_norm in (None, CLIP_NORM):
            run = {}
            for shard in (True, False):
                model = dp.make_model(dtype=dtype)
                optimizer = None if max_norm is None else SGD
                engine = data_parallel_engine(model, shard, optimizer, max_norm=max_norm)
                norms = train(engine, STEPS, rank, world)
                run[shard] = {"params": parameters(model), "masters": masters(engine), "norms": norms}
            results["runs"][(str(dtype), max_norm)] = run
    results["groups"] = groups_scenario(rank, world)
    results["decay_only"] = zero_gradient_step(rank, world)
    results["memory"] = optimizer_memory(rank, world)
    results["refusals"] = refusals(world)
    return results


def groups_scenario(rank, world):
    """Weight-decay groups: AdamW sharded and unsharded (parameters and consolidated state dicts); SGD sharded
    with and without the groups, and a single-process Engine with them."""
    outcome = {}
    runs = (
        ("sharded", True, None, True),
        ("unsharded", False, None, True),
        ("sgd_sharded", True, SGD, True),
        ("sgd_ungrouped", True, SGD, False),
    )
    for name, shard, optimizer, grouped in runs:
        model = dp.make_model()
        engine = data_parallel_engine(model, shard, optimizer, param_groups=decay_groups(model) if grouped else None)
        train(engine, STEPS, rank, world)
        outcome[name] = parameters(model)
        outcome[f"{name}_state"] = engine.consolidated_state_dict()
    model = dp.make_model()
    train(single_process_engine(model, SGD, param_groups=decay_groups(model)), STEPS, 0, None)
    outcome["sgd_single_process"] = parameters(model)
    return outcome


def zero_gradient_step(rank, world, lr=0.1):
    """One AdamW step whose gradient is exactly zero: Adam's update is 0, so only decoupled weight decay
    moves a parameter, by the factor (1 - lr * weight_decay) of its own group."""
    model = dp.make_model()
    before = parameters(model)
    engine = me.Engine(
        model,
        functools.partial(torch.optim.AdamW, lr=lr),
        micro_batch_size=2,
        process_group=dist.group.WORLD,
        param_groups=decay_groups(model),
    )
    engine.step(batch_for(0, rank, world), lambda model, batch: (dp.summed_loss(model, batch)[0] * 0, 1))
    pieces = [(_index_of(model, p), first, end) for p, _, first, end in engine.optimizer.pieces]
    return {"before": before, "after": parameters(model), "lr": lr, "pieces": pieces}


def _index_of(model, parameter):
    return next(i for i, p in enumerate(model.parameters()) if p is parameter)


def optimizer_bytes(optimizer):
    """Bytes of the fp32 masters and every optimizer state tensor, each storage counted once."""
    tensors = [] if optimizer.master_data is None else [optimizer.master_data]
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def optimizer_memory(rank, world, width=128, bucket_bytes=2**18):
    """Optimizer bytes (masters + state) of this rank after one step of a bf16 model: ZeRO-1, unsharded data
    parallelism (buckets of bucket_bytes: several, each padded to a multiple of 64 x world elements), and a
    single-process Engine."""
    measured = {}
    for name in ("sharded", "unsharded", "single_process"):
        model = dp.make_model(dtype=torch.bfloat16, width=width)
        if name == "single_process":
            engine, rank_of, world_of = single_process_engine(model), 0, None
        else:
            engine = data_parallel_engine(model, name == "sharded", bucket_bytes=bucket_bytes)
            rank_of, world_of = rank, world
            measured["buckets"] = len(engine.buffer.buckets)
        train(engine, 1, rank_of, world_of)
        measured[name] = optimizer_bytes(engine.optimizer)
        measured["parameters"] = sum(p.numel() for p in model.parameters())
    return measured


def refusals(world):
    """Error messages of optimizers ZeRO-1 must refuse, and of an accepted factory (None when it builds)."""
    model = torch.nn.Linear(64, 64 * world)
    buffer = GradBuffer(model, bucket_bytes=2**20, bucket_multiple=world)

    def build(optimizer):
        return me.MasterOptimizer(optimizer, buffer, shard=True, process_group=dist.group.WORLD)

    messages = {
        "LBFGS": error_of(lambda: build(torch.optim.LBFGS)),
        "lambda building LBFGS": error_of(lambda: build(lambda params: torch.optim.LBFGS(params, lr=0.1))),
        "Adafactor": error_of(lambda: build(torch.optim.Adafactor))
        if hasattr(torch.optim, "Adafactor")
        else "torch.optim.Adafactor is missing from this torch",
    }
    accepted = build(lambda params: torch.optim.AdamW(params, lr=0.1))
    messages["lambda building AdamW"] = type(accepted.optimizer).__name__
    buffer.release()
    return messages


# -- layouts the plain runs do not reach -------------------------------------------------------------------
class ScaledLinear(torch.nn.Module):
    """A linear map times a learned 0-dim scale (as CLIP's logit_scale): a parameter with no dimension."""

    def __init__(self, width):
        super().__init__()
        self.linear = torch.nn.Linear(width, width)
        self.scale = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.linear(x) * self.scale


def _mean_square_loss(model, batch):
    return model(batch).square().sum(), batch.numel()


def _data(step, rank, world, rows, width):
    generator = torch.Generator().manual_seed(100 + step)
    data = torch.randn(rows * world, width, generator=generator)
    return data[rank * rows : (rank + 1) * rows]


def edge_layouts(rank, world, names=("tiny", "named_groups", "scalar_parameter")):
    """For each model: the sharded run's consolidated state dict against the unsharded one's state dict after
    2 steps, a fresh sharded Engine loaded from it, and that Engine's next step against the unsharded
    one's. Models: one tiny parameter (every shard but rank 0's holds only padding), named param groups,
    a 0-dim parameter."""

    def tiny():
        torch.manual_seed(0)
        return torch.nn.Linear(2, 1, bias=False), None

    def named_groups():
        model = dp.make_model()
        return model, decay_groups(model)

    def scalar_parameter():
        torch.manual_seed(0)
        return ScaledLinear(8), None

    outcome = {}
    builders = {"tiny": tiny, "named_groups": named_groups, "scalar_parameter": scalar_parameter}
    for name in names:
        build = builders[name]
        engines = {}
        for shard in (True, False):
            model, groups = build()
            engines[shard] = data_parallel_engine(model, shard, param_groups=groups)
        if name == "named_groups":

            def step(engine, index):
                return engine.step(batch_for(index, rank, world), dp.summed_loss)

        else:
            width = 2 if name == "tiny" else 8

            def step(engine, index, width=width):
                return engine.step(_data(index, rank, world, 4, width), _mean_square_loss)

        for index in range(2):
            for engine in engines.values():
                step(engine, index)
        # Snapshots: state dicts hold references to the live parameters and state, which the next step changes.
        consolidated = copy.deepcopy(engines[True].consolidated_state_dict())
        expected = copy.deepcopy(engines[False].state_dict())
        model, groups = build()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)  # the load must replace these
        loaded = data_parallel_engine(model, True, param_groups=groups)
        loaded.load_state_dict(copy.deepcopy(consolidated))
        reloaded = copy.deepcopy(loaded.consolidated_state_dict())
        step(loaded, 2)
        step(engines[False], 2)
        outcome[name] = {
            "consolidated vs unsharded": differences(consolidated, expected),
            "reloaded vs consolidated": differences(reloaded, consolidated),
            "next step": differences(parameters(loaded.model), parameters(engines[False].model)),
        }
    return outcome


# -- resume --------------------------------------------------------------------------------------------------
RESUME_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FP16_OPTIONS = {"initial_loss_scale": 2.0**14, "growth_interval": 2}  # grows, then overflows (skips) in 6 steps
# AdamW with step counts and moments. eps well above the rounding noise of gradients that are zero in exact
# arithmetic (see SGD): the next step on another world size sums gradients in another order, and with the
# default eps Adam would turn that noise into steps of about lr on those parameters.
RESUME_OPTIMIZER = functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=WEIGHT_DECAY, eps=1e-4)


def resume_engine(dtype_name, rank=0, world=None, seed=0, shard=True):
    """A fresh model and Engine as the resume tests build them (fp16: dynamic loss scaling that moves)."""
    model = dp.make_model(dtype=RESUME_DTYPES[dtype_name], seed=seed)
    options = FP16_OPTIONS if dtype_name == "fp16" else {}
    if world is None:
        return single_process_engine(model, RESUME_OPTIMIZER, **options)
    return data_parallel_engine(model, shard, RESUME_OPTIMIZER, **options)


def scaling_state(engine):
    state = engine.state_dict()
    return {key: state[key] for key in ("loss_scale", "good_steps", "steps")}


def shard_path(directory, dtype_name, rank, world):
    return os.path.join(directory, f"{dtype_name}-rank{rank}-of-{world}.pt")


def consolidated_path(directory, dtype_name):
    return os.path.join(directory, f"{dtype_name}-consolidated.pt")


def dcp_path(directory):
    return os.path.join(directory, "bf16-consolidated-dcp")


def single_process_path(directory, dtype_name):
    return os.path.join(directory, f"{dtype_name}-single-process.pt")


def single_process_straight_and_save(directory):
    """A single-process Engine: 6 steps straight (masters after step 4; parameters and scaling state after step
    6), and 3 steps saved for a new process to resume. (In a rank process, not the test's: results depend on
    the number of intra-op threads, which is 1 in every rank.)"""
    outcome = {}
    for dtype_name in RESUME_DTYPES:
        straight = resume_engine(dtype_name)
        train(straight, 4, 0, None)
        masters_4 = masters(straight)
        train(straight, 2, 0, None, first=4)
        saved = resume_engine(dtype_name)
        train(saved, 3, 0, None)
        torch.save(saved.state_dict(), single_process_path(directory, dtype_name))
        outcome[dtype_name] = {
            "masters_4": masters_4,
            "after_6": parameters(straight.model),
            "state_6": scaling_state(straight),
            "saved_state": scaling_state(saved),
        }
    return outcome


def zero1_straight_and_save(rank, world, directory):
    """Rank 0 first runs single_process_straight_and_save. 2-rank ZeRO-1: 6 steps straight (parameters after
    steps 3, 4 and 6; masters after step 4), and a second run of 3 steps that saves per-rank state dicts, the
    consolidated one (torch.save from rank 0, and torch.distributed.checkpoint from all ranks). Then the
    single-process 3-step save loaded into a fresh 2-rank ZeRO-1 Engine: its consolidated dict and next step."""
    outcome = {"single_process": single_process_straight_and_save(directory) if rank == 0 else None}
    dist.barrier()
    for dtype_name in RESUME_DTYPES:
        straight = resume_engine(dtype_name, rank, world)
        train(straight, 3, rank, world)
        after_3 = parameters(straight.model)
        train(straight, 1, rank, world, first=3)
        after_4, masters_4 = parameters(straight.model), masters(straight)
        train(straight, 2, rank, world, first=4)
        saved = resume_engine(dtype_name, rank, world)
        train(saved, 3, rank, world)
        torch.save(saved.state_dict(), shard_path(directory, dtype_name, rank, world))
        consolidated = saved.consolidated_state_dict()
        if rank == 0:
            torch.save(consolidated, consolidated_path(directory, dtype_name))
        if dtype_name == "bf16":
            dcp.save(consolidated, checkpoint_id=dcp_path(directory))
        outcome[dtype_name] = {
            "after_3": after_3,
            "after_4": after_4,
            "masters_4": masters_4,
            "after_6": parameters(straight.model),
            "state_6": scaling_state(straight),
            "saved_state": scaling_state(saved),
        }
    single = torch.load(single_process_path(directory, "bf16"), weights_only=True)
    loaded = resume_engine("bf16", rank, world, seed=5)
    loaded.load_state_dict(single)
    outcome["from_single_process"] = {
        "consolidated vs single-process": differences(loaded.consolidated_state_dict(), single),
    }
    train(loaded, 1, rank, world, first=3)
    outcome["from_single_process"]["masters_4"] = masters(loaded)
    return outcome


def zero1_resume(rank, world, directory):
    """New processes: the other rank's shard is refused; this rank's shard loads and 3 more steps run."""
    outcome = {}
    for dtype_name in RESUME_DTYPES:
        engine = resume_engine(dtype_name, rank, world, seed=5)
        other = torch.load(shard_path(directory, dtype_name, 1 - rank, world), weights_only=True)
        outcome[f"{dtype_name} other rank's shard"] = error_of(
            lambda engine=engine, other=other: engine.load_state_dict(other)
        )
        engine.load_state_dict(torch.load(shard_path(directory, dtype_name, rank, world), weights_only=True))
        outcome[f"{dtype_name} loaded"] = {"params": parameters(engine.model), "state": scaling_state(engine)}
        train(engine, 3, rank, world, first=3)
        outcome[dtype_name] = {"params": parameters(engine.model), "state": scaling_state(engine)}
    return outcome


def dcp_as_state_dict(directory):
    """The state dict saved with torch.distributed.checkpoint, read back whole: rank 0 converts the checkpoint
    into a torch.save file (dcp.load itself needs a template of the same structure, which a fresh Engine's
    optimizer, without state until its first step, cannot give)."""
    converted = os.path.join(directory, "bf16-from-dcp.pt")
    if dist.get_rank() == 0:
        dcp_to_torch_save(dcp_path(directory), converted)
    dist.barrier()
    return torch.load(converted, weights_only=False)


def index_keyed(state_dict):
    """state_dict with the optimizer state's keys (strings after a DCP round trip) back to parameter indices."""
    optimizer = state_dict["optimizer"]
    return {**state_dict, "optimizer": {**optimizer, "state": {int(k): v for k, v in optimizer["state"].items()}}}


def load_consolidated_elsewhere(rank, world, directory):
    """On another world size (1 rank: a single-process Engine and a 1-rank ZeRO-1 Engine; 4 ranks: ZeRO-1):
    the 2-rank run's per-rank shard is refused, and its consolidated state dict (torch.save and DCP) loads
    and takes the 4th step (fp32 masters after it)."""
    consolidated = consolidated_path(directory, "bf16")
    outcome = {
        "shard of rank 0 of 2": error_of(
            lambda: resume_engine("bf16", rank, world).load_state_dict(
                torch.load(shard_path(directory, "bf16", 0, 2), weights_only=True)
            )
        ),
        "dcp vs torch.save": differences(
            index_keyed(dcp_as_state_dict(directory)),
            torch.load(consolidated, weights_only=True),
        ),
    }
    kinds = [("zero1", world)] + ([("single_process", None)] if world == 1 else [])
    for kind, world_of in kinds:
        for source in ("torch.save", "dcp"):
            engine = resume_engine("bf16", rank, world_of, seed=5)
            state = (
                torch.load(consolidated, weights_only=True) if source == "torch.save" else dcp_as_state_dict(directory)
            )
            engine.load_state_dict(state)
            train(engine, 1, rank, world_of, first=3)
            outcome[f"{kind} from {source}"] = masters(engine)
    if world == 1:
        outcome["single-process shard into single process"] = error_of(
            lambda: resume_engine("bf16").load_state_dict(
                torch.load(shard_path(directory, "bf16", 0, 2), weights_only=True)
            )
        )
        outcome["single-process resume"] = single_process_resume(directory)
    return outcome


def single_process_resume(directory):
    """New process: a single-process Engine loads the test's 3-step save and runs steps 4 to 6."""
    outcome = {}
    for dtype_name in RESUME_DTYPES:
        engine = resume_engine(dtype_name, seed=5)
        engine.load_state_dict(torch.load(single_process_path(directory, dtype_name), weights_only=True))
        loaded_state = scaling_state(engine)
        train(engine, 3, 0, None, first=3)
        outcome[dtype_name] = {
            "params": parameters(engine.model),
            "loaded": loaded_state,
            "state": scaling_state(engine),
        }
    return outcome
