"""ShardedMasterOptimizer: ZeRO-1. Each rank keeps fp32 master weights and optimizer state only for its
own shard of every bucket of the GradBuffer.

A bucket of the buffer (GradBuffer(bucket_bytes=..., bucket_multiple=world)) splits into `world` equal
contiguous shards; rank r owns shard r of every bucket. Where a shard meets a parameter, the
rank holds a *piece* of it: a master for that element range, 1-D, or shaped like the parameter when it
holds all of it (fp32 parameters: a view of the parameter itself; bf16/fp16 ones: a slice of one flat
fp32 tensor of this rank's shards), whose
gradient is the same range of the buffer, which the reduce-scatter (memengine.distributed.GradReducer
with shard=True) left holding the sum over ranks. The wrapped torch optimizer steps the pieces:
param groups, weight decay and per-group options apply per parameter, because every piece sits in
its parameter's group. After the step each bucket's updated values are all-gathered (one collective
per bucket, in the parameters' dtype) back into the model's parameters on every rank.

Only optimizers whose update of an element depends on that element alone can step flat pieces of a
parameter exactly (SGD, Adam, AdamW, ...); others (Adafactor factors rows and columns, LBFGS
couples everything) are refused, whatever class or factory builds them. A factory (optimizer_cls that
is not a class) is called with one parameter group, [{"params": pieces}], on every rank alike (a rank
whose shards hold only padding has no piece).

state_dict() is this rank's shard (with the layout it belongs to); consolidated_state_dict(), a
collective, is the state dict an unsharded MasterOptimizer over the same parameters would have (param
names included), loadable with any world size, sharded or not. load_state_dict refuses a shard of
another rank or layout (ValueError) and accepts state keyed by index strings, as
torch.distributed.checkpoint returns it (with_index_keys).
"""

import torch
import torch.distributed as dist

from memengine.distributed import collectives
from memengine.grad.buffer import layout
from memengine.grad.master_optimizer import MASTER_WEIGHTS_KEY, MasterOptimizer, with_index_keys

SHARD_KEY = "shard"
# torch.optim classes whose update of each element reads only that element's gradient and state.
ELEMENTWISE_OPTIMIZERS = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Rprop", "Adagrad", "Adadelta")
    if hasattr(torch.optim, name)
)


def default_group():
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "memengine data parallelism needs torch.distributed initialised: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment for backend='nccl' "
            "or 'gloo'), or pass process_group="
        )
    return dist.group.WORLD


class ShardedMasterOptimizer(MasterOptimizer):
    """MasterOptimizer(optimizer_cls, buffer, shard=True, process_group=None, **options): ZeRO-1 (module
    docstring). process_group defaults to torch.distributed's world."""

    def __init__(self, optimizer_cls, buffer, *, process_group=None, param_groups=None, shard=True, **kwargs):
        self.group = process_group if process_group is not None else default_group()
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        for bucket in buffer.buckets:
            if bucket.numel % self.world:
                raise ValueError(
                    f"MasterOptimizer(shard=True): bucket {bucket.index} of the GradBuffer has {bucket.numel} "
                    f"elements, which do not split into {self.world} shards; build the buffer with "
                    f"bucket_multiple={self.world} (memengine.Engine(process_group=...) does)"
                )
        for p in buffer.params:
            if not p.is_contiguous():
                raise ValueError(
                    f"MasterOptimizer(shard=True): a parameter of shape {tuple(p.shape)} is not contiguous; its "
                    "shard of elements cannot be addressed as a flat range"
                )
        self.paths = collectives.probe(self.group, buffer.data.device)
        self.buffer = buffer
        self.shards = []  # (bucket, start, end) of this rank's shard of each bucket, in buffer coordinates
        for bucket in buffer.buckets:
            self.shards.append((bucket, *bucket.shard(self.rank, self.world)))
        low_precision = any(p.dtype != torch.float32 for p in buffer.params)
        shard_numel = sum(end - start for _, start, end in self.shards)
        device = buffer.data.device
        self.master_data = torch.zeros(shard_numel, dtype=torch.float32, device=device) if low_precision else None
        self.offset_of = offset_of = {id(p): offset for p, offset in zip(buffer.params, buffer.offsets, strict=True)}
        self.masters = []  # (model parameter, its piece's master)
        self.pieces = []  # (model parameter, master, first element, end element) within the flat parameter
        position = 0  # where the current shard starts in master_data
        for bucket, start, end in self.shards:
            for p in bucket.params:
                offset = offset_of[id(p)]
                first, last = max(start, offset), min(end, offset + p.numel())
                if first >= last:
                    continue
                # A piece holding the whole parameter keeps its shape, so that its optimizer state is shaped as
                # an unsharded optimizer's (a 0-dim parameter's state is 0-dim, not one element).
                shape = p.shape if last - first == p.numel() else (last - first,)
                elements = p.detach().view(-1)[first - offset : last - offset].view(shape)
                if p.dtype == torch.float32:
                    master = torch.nn.Parameter(elements)  # the parameter's own storage: stepped in place
                else:
                    view = self.master_data[position + first - start : position + last - start].view(shape)
                    view.copy_(elements)
                    master = torch.nn.Parameter(view)
                self.masters.append((p, master))
                self.pieces.append((p, master, first - offset, last - offset))
            position += end - start
        self._low_precision = [(p, m) for p, m in self.masters if p.dtype != torch.float32]
        self._piece_range = {id(master): (first, end) for _, master, first, end in self.pieces}
        self._record_weights()
        if param_groups is None and not isinstance(optimizer_cls, torch.optim.Optimizer):
            # One group of every parameter in registration order, as an unsharded MasterOptimizer has it; given
            # as a group because a rank whose shards hold only padding has no piece, and torch.optim refuses
            # an empty parameter list but not an empty group.
            param_groups = [{"params": list(reversed(buffer.params))}]
        # Every parameter of the buffer in the order an unsharded optimizer's groups list it (state dict
        # indices), and each group's parameter names when it was given (name, parameter) pairs.
        self._group_params, self._group_names = self._full_groups(optimizer_cls, param_groups)
        self._build(optimizer_cls, param_groups, kwargs)
        if not isinstance(self.optimizer, ELEMENTWISE_OPTIMIZERS):
            raise ValueError(
                f"MasterOptimizer(shard=True): {type(self.optimizer).__name__} is not one of the optimizers whose "
                "update of an element depends on that element alone "
                f"({', '.join(c.__name__ for c in ELEMENTWISE_OPTIMIZERS)}); ZeRO-1 steps flat pieces of each "
                "parameter and would silently change what an optimizer that factors or couples elements computes "
                "(Adafactor, LBFGS). Use shard=False"
            )

    @staticmethod
    def _full_groups(optimizer_cls, param_groups):
        """([parameters of each group], [names of each group, or None]) of the groups as given."""
        if isinstance(optimizer_cls, torch.optim.Optimizer):
            groups = optimizer_cls.param_groups
            return [list(group["params"]) for group in groups], [group.get("param_names") for group in groups]
        params_of, names_of = [], []
        for group in param_groups:
            params = group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            params_of.append([entry[1] if isinstance(entry, tuple) else entry for entry in params])
            named = bool(params) and all(isinstance(entry, tuple) for entry in params)
            names_of.append([entry[0] for entry in params] if named else None)
        return params_of, names_of

    # -- the step ------------------------------------------------------------------------------------
    def _attach_gradients(self):
        offset_of = self.offset_of
        for p, master, first, end in self.pieces:
            received = self.buffer.received_gradient(p)
            offset = offset_of[id(p)]
            master.grad = self.buffer.data[offset + first : offset + end].view_as(master) if received else None

    def step(self, closure=None):
        if closure is not None:
            raise ValueError(
                "MasterOptimizer(shard=True).step does not take a closure (ZeRO-1 steps each rank's shard)"
            )
        return super().step()

    @torch.no_grad()
    def refresh_model(self):
        """Model parameters <- masters on every rank: each rank's pieces go into its shard of a gather buffer
        per bucket (the parameters' dtype; fp32 if a bucket mixes dtypes), one all-gather per bucket, then
        every parameter is copied out. A collective: every rank calls it."""
        offset_of = self.offset_of
        pieces_of = {}
        for p, master, first, end in self.pieces:
            pieces_of.setdefault(id(p), []).append((master, first, end))
        pending = None
        for bucket, _, _ in self.shards:
            dtypes = {p.dtype for p in bucket.params}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
            gathered = torch.zeros(bucket.numel, dtype=dtype, device=self.buffer.data.device)
            for p in bucket.params:
                for master, first, last in pieces_of.get(id(p), ()):
                    at = offset_of[id(p)] + first - bucket.start
                    gathered[at : at + last - first] = master.detach().reshape(-1)
            work = collectives.all_gather_in_place(gathered, self.group, self.paths["all_gather"])
            if pending is not None:
                self._copy_out(*pending, offset_of)
            pending = (work, bucket, gathered)
        if pending is not None:
            self._copy_out(*pending, offset_of)
        self._record_weights()

    def _master_part(self, p, master):
        first, end = self._piece_range[id(master)]
        return p.detach().reshape(-1)[first:end].view_as(master)

    @staticmethod
    def _copy_out(work, bucket, gathered, offset_of):
        work.wait()
        for p in bucket.params:
            at = offset_of[id(p)] - bucket.start
            p.detach().view(-1).copy_(gathered[at : at + p.numel()])

    # -- state -------------------------------------------------------------------------------------------
    def _layout_signature(self):
        return {
            "world": self.world,
            "rank": self.rank,
            "buckets": [(bucket.start, bucket.end) for bucket in self.buffer.buckets],
            "numel": self.buffer.data.numel(),
        }

    def state_dict(self):
        """This rank's shard: the wrapped optimizer's state over its pieces, its masters and the layout they
        belong to (loadable only by the same rank of the same layout; see consolidated_state_dict)."""
        self.follow_changed_weights()
        state = torch.optim.Optimizer.state_dict(self)
        state[MASTER_WEIGHTS_KEY] = None if self.master_data is None else self.master_data.clone()
        state[SHARD_KEY] = self._layout_signature()
        return state

    def load_state_dict(self, state_dict):
        """Loads this rank's state_dict() of the same layout, or a consolidated one (any world size, sharded
        or not: consolidated_state_dict() or an unsharded MasterOptimizer's state_dict()). A shard of another
        rank or layout raises ValueError before anything changes. A collective (the model is refreshed from
        the masters): every rank calls it."""
        state_dict = with_index_keys(state_dict)
        if SHARD_KEY not in state_dict:
            state_dict = self._shard_of(state_dict)
        elif state_dict[SHARD_KEY] != self._layout_signature():
            saved = state_dict[SHARD_KEY]
            raise ValueError(
                f"MasterOptimizer(shard=True).load_state_dict: this is the shard of rank {saved['rank']} of "
                f"{saved['world']} (a ZeRO-1 state_dict(), {saved['numel']} buffer elements in "
                f"{len(saved['buckets'])} buckets), but this is rank {self.rank} of {self.world} "
                f"({self.buffer.data.numel()} elements in {len(self.buffer.buckets)} buckets); a shard loads only "
                "on the same rank of the same layout. To change the world size, save consolidated_state_dict() "
                "(any world size, sharded or not, loads it)"
            )
        masters = state_dict[MASTER_WEIGHTS_KEY]
        if (masters is None) != (self.master_data is None):
            raise ValueError(
                "MasterOptimizer(shard=True).load_state_dict: the state dict's master weights do not match this "
                "model's parameter dtypes; it is from a different model"
            )
        torch.optim.Optimizer.load_state_dict(self, {k: v for k, v in state_dict.items() if k != SHARD_KEY})
        if masters is not None:
            self.master_data.copy_(masters)
        self.refresh_model()

    def _piece_index(self):
        """For every piece here: (model parameter, master, its index in the consolidated state dict, the
        piece's index in this rank's optimizer state dict, first, end)."""
        master_position = {}
        for group in self.param_groups:
            for master in group["params"]:
                master_position[id(master)] = len(master_position)
        full_position = {}
        for params in self._group_params:
            for p in params:
                full_position[id(p)] = len(full_position)
        return [
            (p, master, full_position[id(p)], master_position[id(master)], first, end)
            for p, master, first, end in self.pieces
        ]

    def consolidated_state_dict(self):
        """The state dict an unsharded MasterOptimizer over the same parameters (in the unbucketed layout)
        has: every parameter's full optimizer state and master weights, gathered from all ranks. A
        collective: every rank calls it and gets the same dict."""
        device = self.buffer.data.device
        own = torch.optim.Optimizer.state_dict(self)
        offsets, total, _ = layout(self.buffer.params)
        canonical_offset = {id(p): offset for p, offset in zip(self.buffer.params, offsets, strict=True)}
        index = self._piece_index()
        # Per-element state (a tensor shaped like its piece) goes through flat tensors of the canonical
        # layout, one SUM all-reduce per state key (each element is nonzero on one rank only); the rest
        # (step counts, and all state of a 0-dim parameter) and which parameter has which keys travel as
        # objects.
        described = {}  # consolidated index -> (per-element keys, other values)
        for _, master, full, mine, _, _ in index:
            if mine not in own["state"]:
                continue
            keys, others = described.setdefault(full, (set(), {}))
            for key, value in own["state"][mine].items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == master.shape:
                    keys.add(key)
                else:
                    others[key] = value.cpu() if isinstance(value, torch.Tensor) else value
        everyone = [None] * self.world
        dist.all_gather_object(everyone, described, group=self.group)
        merged = {}
        for rank_described in everyone:
            for full, (keys, others) in rank_described.items():
                merged_keys, merged_others = merged.setdefault(full, (set(), {}))
                merged_keys.update(keys)
                merged_others.update(others)
        flats = {}
        for key in sorted({key for keys, _ in merged.values() for key in keys}):
            flat = torch.zeros(total, dtype=torch.float32, device=device)
            for p, _, _, mine, first, end in index:
                value = own["state"].get(mine, {}).get(key)
                if value is not None:
                    at = canonical_offset[id(p)]
                    flat[at + first : at + end] = value.reshape(-1)
            dist.all_reduce(flat, group=self.group)
            flats[key] = flat
        masters = None
        if self.master_data is not None:
            masters = torch.zeros(total, dtype=torch.float32, device=device)
            for p, master, first, end in self.pieces:
                if p.dtype != torch.float32:
                    at = canonical_offset[id(p)]
                    masters[at + first : at + end] = master.detach().reshape(-1)
            dist.all_reduce(masters, group=self.group)
        state = {}
        position = 0
        for params in self._group_params:
            for p in params:
                if position in merged:
                    keys, others = merged[position]
                    at = canonical_offset[id(p)]
                    values = dict(others)
                    for key in keys:
                        values[key] = flats[key][at : at + p.numel()].view_as(p).clone()
                    state[position] = values
                position += 1
        groups = []
        position = 0
        for group, params, names in zip(self.param_groups, self._group_params, self._group_names, strict=True):
            options = {key: value for key, value in group.items() if key not in ("params", "param_names")}
            if names is not None:
                options["param_names"] = list(names)  # every parameter's, not only this rank's pieces'
            groups.append({**options, "params": list(range(position, position + len(params)))})
            position += len(params)
        return {"state": state, "param_groups": groups, MASTER_WEIGHTS_KEY: masters}

    def _shard_of(self, consolidated):
        """This rank's state_dict() cut out of a consolidated one."""
        offsets, total, _ = layout(self.buffer.params)
        canonical_offset = {id(p): offset for p, offset in zip(self.buffer.params, offsets, strict=True)}
        groups = consolidated["param_groups"]
        if len(groups) != len(self._group_params) or any(
            len(group["params"]) != len(params) for group, params in zip(groups, self._group_params, strict=True)
        ):
            raise ValueError(
                "MasterOptimizer(shard=True).load_state_dict: the state dict's param groups do not match this "
                "optimizer's (another model or other param_groups)"
            )
        state = {}
        for p, master, full, mine, first, end in self._piece_index():
            values = consolidated["state"].get(full)
            if values is None:
                continue
            if master.shape == p.shape:  # the whole parameter: its state as it is
                state[mine] = dict(values)
                continue
            state[mine] = {
                key: value.reshape(-1)[first:end].clone()
                if isinstance(value, torch.Tensor) and value.shape == p.shape
                else value
                for key, value in values.items()
            }
        own_groups = []
        position = 0
        for group, options in zip(self.param_groups, groups, strict=True):
            settings = {key: value for key, value in options.items() if key not in ("params", "param_names")}
            if "param_names" in group:
                settings["param_names"] = group["param_names"]  # this rank's pieces' names
            own_groups.append({**settings, "params": list(range(position, position + len(group["params"])))})
            position += len(group["params"])
        masters = consolidated.get(MASTER_WEIGHTS_KEY)
        shard_masters = None
        if masters is not None and self.master_data is not None:
            if masters.numel() != total:
                raise ValueError(
                    f"MasterOptimizer(shard=True).load_state_dict: master weights of {masters.numel()} elements do "
                    f"not fit this model's {total}; the state dict is from a different model"
                )
            shard_masters = torch.zeros_like(self.master_data)
            position = 0
            offset_of = self.offset_of
            for bucket, start, end in self.shards:
                for p in bucket.params:
                    offset = offset_of[id(p)]
                    first, last = max(start, offset), min(end, offset + p.numel())
                    if first < last and p.dtype != torch.float32:
                        at = canonical_offset[id(p)]
                        shard_masters[position + first - start : position + last - start] = masters[
                            at + first - offset : at + last - offset
                        ]
                position += end - start
        elif masters is not None:
            shard_masters = masters  # refused below: this model has no low-precision parameters
        return {"state": state, "param_groups": own_groups, MASTER_WEIGHTS_KEY: shard_masters}


MasterOptimizer.sharded_class = ShardedMasterOptimizer
