"""MasterOptimizer: fp32 master weights for low-precision parameters, stepped by any torch optimizer.

The masters of all bf16/fp16 parameters live in one flat fp32 tensor laid out like the
GradBuffer, so each master's .grad is simply its main_grad view: the wrapped optimizer steps
fp32 values with fp32 gradients, then the model parameters are refreshed from the masters in
one multi-tensor copy (torch._foreach_copy_, which casts). fp32 parameters are stepped in place
(they are their own masters).

MasterOptimizer is a torch.optim.Optimizer whose `param_groups`, `state` and `defaults` are the
wrapped optimizer's own objects (one copy, never two): learning-rate schedulers, per-group
options, step hooks and state_dict work as with the wrapped optimizer. Groups and state refer to
the masters (for fp32 parameters, the parameters themselves).
"""

import inspect

import torch

from memengine.grad.buffer import layout

MASTER_WEIGHTS_KEY = "master_weights"
# torch.optim.Optimizer's hook registries: hooks on an optimizer instance MasterOptimizer replaces would be lost.
_OPTIMIZER_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


def with_index_keys(optimizer_state_dict):
    """optimizer_state_dict with its "state" keyed by parameter index (int), as torch.optim and MasterOptimizer
    save it. torch.distributed.checkpoint turns dictionary keys into strings ("0", "1", ...), and
    torch.optim.Optimizer.load_state_dict keeps state under keys it does not know without using it: the
    optimizer would silently restart from empty state. Keys that are not indices raise ValueError."""
    state = optimizer_state_dict.get("state", {})
    if all(isinstance(key, int) for key in state):
        return optimizer_state_dict
    indexed = {}
    for key, value in state.items():
        if isinstance(key, str) and key.isdigit():
            key = int(key)
        if not isinstance(key, int):
            raise ValueError(
                f"MasterOptimizer.load_state_dict: optimizer state keyed by {key!r}, not by parameter index; load "
                "a state dict saved by MasterOptimizer / memengine.Engine (a parameter-name-keyed one, as "
                "torch.distributed.checkpoint.state_dict.get_optimizer_state_dict makes, does not fit)"
            )
        indexed[key] = value
    return {**optimizer_state_dict, "state": indexed}


class MasterOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer that steps fp32 master copies of a GradBuffer's parameters.

    MasterOptimizer(torch.optim.AdamW, buffer, lr=3e-4) builds the wrapped optimizer (here AdamW)
    over one master per parameter of `buffer`: for a bf16/fp16 parameter an fp32 copy (a view of
    one flat fp32 tensor laid out like the buffer), for an fp32 parameter the parameter itself.
    Each master's gradient is its parameter's main_grad in the buffer, so the wrapped optimizer
    sees fp32 gradients without a copy.

    zero_grad() opens a new accumulation window in the buffer; step() steps the masters with the
    gradients accumulated since (parameters that received none are skipped, as torch skips
    .grad None) and then writes the masters back into the model parameters (cast to their dtype).
    param_groups, state and defaults are the wrapped optimizer's own objects and refer to the
    masters: learning-rate schedulers, per-group options and step hooks attach here.
    state_dict() adds the masters ("master_weights"); load_state_dict() restores them and refreshes
    the model. Weights changed after the optimizer was built (model.load_state_dict, an init function,
    an in-place edit under torch.no_grad, a .data assignment) are seen by their version counters and
    data pointers at the next step() or state_dict(), and their masters are re-derived from them (an
    in-place edit of parameter.data changes neither: call refresh_masters() after one). It cannot be
    pickled or deep-copied, and add_param_group is refused (the parameters are fixed by the buffer).
    """

    # Set by memengine.distributed (a layer above this one): the class MasterOptimizer(..., shard=True) builds.
    sharded_class = None

    def __new__(cls, *args, shard=False, **kwargs):
        if shard and cls is MasterOptimizer:
            if MasterOptimizer.sharded_class is None:
                raise RuntimeError("MasterOptimizer(shard=True) needs memengine.distributed (import memengine)")
            return super().__new__(MasterOptimizer.sharded_class)
        return super().__new__(cls)

    def __init__(self, optimizer_cls, buffer, *, param_groups=None, shard=False, **kwargs):
        """optimizer_cls: a torch.optim.Optimizer class or a factory taking what such a class takes
        (e.g. functools.partial(torch.optim.AdamW, lr=...)); it is called with the masters and
        **kwargs. Or an optimizer instance built over the model's parameters and not yet stepped:
        an optimizer of its type is built over the masters with its param groups (each parameter
        replaced by its master) and its defaults; the instance itself is left unused.
        param_groups: optional list of dicts as torch.optim takes them, holding the model's
        parameters (or (name, parameter) pairs) with per-group options; together they must cover
        every parameter of `buffer` exactly once.
        shard: ZeRO-1 over a process group (memengine.distributed.ShardedMasterOptimizer, which takes
        process_group=); this class itself is unsharded."""
        if shard:
            raise ValueError("MasterOptimizer: shard=True is handled by memengine.distributed.ShardedMasterOptimizer")
        self.buffer = buffer
        self.master_data = None  # allocated only when some parameter is not fp32
        if any(p.dtype != torch.float32 for p in buffer.params):
            # zeros, not empty: the slots of fp32 parameters are never used but are saved by state_dict
            self.master_data = torch.zeros(buffer.data.numel(), dtype=torch.float32, device=buffer.data.device)
        self.masters = []  # (model parameter, master parameter) in buffer order
        for p, offset in zip(buffer.params, buffer.offsets, strict=True):
            if p.dtype == torch.float32:
                master = p
            else:
                view = self.master_data[offset : offset + p.numel()].view_as(p)
                view.copy_(p.detach())
                master = torch.nn.Parameter(view)  # shares master_data's storage
            self.masters.append((p, master))
        self._low_precision = [(p, m) for p, m in self.masters if p.dtype != torch.float32]
        self._record_weights()
        self._build(optimizer_cls, param_groups, kwargs)

    def _build(self, optimizer_cls, param_groups, kwargs):
        """Builds the wrapped optimizer over self.masters and makes this object share its groups and state."""
        if isinstance(optimizer_cls, torch.optim.Optimizer):
            if param_groups is not None or kwargs:
                raise ValueError(
                    "MasterOptimizer: an optimizer instance already holds its param_groups and options; pass "
                    "either the instance alone, or an optimizer class with param_groups= and options"
                )
            self.optimizer = self._rebuilt_over_masters(optimizer_cls)
        elif param_groups is None:
            # The model's registration order (the buffer's is reversed), as torch.optim.X(model.parameters())
            # has it: state dicts index parameters by position, and LBFGS's flat dot products sum in it.
            params = [m for _, m in reversed(self.masters)]
            self.optimizer = optimizer_cls(params, **kwargs)
        else:
            self.optimizer = optimizer_cls(self._master_groups(param_groups), **kwargs)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"MasterOptimizer: optimizer_cls must build a torch.optim.Optimizer, got {type(self.optimizer)}; "
                "pass an optimizer class, a functools.partial of one, or an optimizer instance"
            )
        # Not Optimizer.__init__: it would build a second set of groups from `params`. __setstate__ is
        # torch's own way to set an optimizer up around existing groups and state (unpickling): it
        # creates the hook registries and wraps step() so that step hooks fire.
        self.__setstate__(
            {
                "defaults": self.optimizer.defaults,
                "state": self.optimizer.state,
                "param_groups": self.optimizer.param_groups,
            }
        )
        self._warned_capturable_if_run_uncaptured = True  # as Optimizer.__init__ leaves it

    def _master_groups(self, param_groups):
        """The user's groups of model parameters, with each parameter replaced by its master (a parameter
        of the buffer without a master here, as in a ZeRO-1 shard that does not hold it, is left out)."""
        master_of = {id(p): m for p, m in self.masters}
        covered = {id(p) for p in self.buffer.params}
        grouped = set()
        groups = []
        for group in param_groups:
            params = group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            # Names come as (name, parameter) pairs, or as an optimizer instance's "param_names"; torch refuses
            # named and unnamed groups side by side, so a named group stays named even when it holds no master
            # here (a ZeRO-1 rank whose shards hold none of its parameters): every rank builds the same groups.
            names = group.get("param_names")
            if names is not None:
                params = list(zip(names, params, strict=True))
            named = bool(params) and all(isinstance(entry, tuple) for entry in params)
            masters = []
            for entry in params:
                name, p = entry if isinstance(entry, tuple) else (None, entry)
                if id(p) not in covered:
                    raise ValueError(
                        "MasterOptimizer: a parameter in param_groups is not covered by the GradBuffer "
                        f"(shape {tuple(p.shape)}); build the buffer over it or leave it out"
                    )
                if id(p) in grouped:
                    raise ValueError(
                        f"MasterOptimizer: a parameter (shape {tuple(p.shape)}) is in more than one param group"
                    )
                grouped.add(id(p))
                if id(p) in master_of:
                    masters.append(master_of[id(p)] if name is None else (name, master_of[id(p)]))
            options = {key: value for key, value in group.items() if key not in ("params", "param_names")}
            groups.append({**options, "params": masters, **({"param_names": []} if named and not masters else {})})
        missing = [tuple(p.shape) for p in self.buffer.params if id(p) not in grouped]
        if missing:
            raise ValueError(
                f"MasterOptimizer: {len(missing)} parameter(s) of the GradBuffer are not in any param group "
                f"(shapes {missing[:4]}); every trainable parameter gets a gradient and must be stepped"
            )
        return groups

    def _rebuilt_over_masters(self, instance):
        """A new optimizer of instance's type, with its defaults and param groups, over the masters."""
        name = type(instance).__name__
        if instance.state:
            raise ValueError(
                f"MasterOptimizer: the {name} instance already has state (it has stepped); its state belongs to "
                "the model's parameters, not to the fp32 masters the Engine steps. Pass an optimizer that has not "
                "stepped, or its class/functools.partial, and restore state with engine.load_state_dict"
            )
        if any("initial_lr" in group for group in instance.param_groups):
            raise ValueError(
                f"MasterOptimizer: a learning-rate scheduler is attached to the {name} instance; it would go on "
                "changing an optimizer that no longer steps anything. Create the scheduler over engine.optimizer "
                "(this MasterOptimizer) instead"
            )
        hooks = [hook for hook in _OPTIMIZER_HOOK_REGISTRIES if getattr(instance, hook, None)]
        if hooks:
            raise ValueError(
                f"MasterOptimizer: the {name} instance has hooks registered ({', '.join(hooks)}); they would not "
                "run. Register them on engine.optimizer (this MasterOptimizer) instead"
            )
        groups = self._master_groups(instance.param_groups)
        accepted = inspect.signature(type(instance).__init__).parameters
        takes_any = any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in accepted.values())
        # Not every default is a constructor argument (AdamW sets decoupled_weight_decay itself).
        options = {key: value for key, value in instance.defaults.items() if takes_any or key in accepted}
        return type(instance)(groups, **options)

    def __setstate__(self, state):
        super().__setstate__(state)
        # Optimizer.load_state_dict ends by handing new groups and state to __setstate__: give them to
        # the wrapped optimizer too (through its own __setstate__, which fills in its per-class
        # defaults), so that both keep sharing one copy.
        self.optimizer.__setstate__({"state": self.state, "param_groups": self.param_groups})

    def __getstate__(self):
        raise TypeError(
            "MasterOptimizer cannot be pickled or deep-copied: it shares storage with the model and its "
            "GradBuffer; save and load state_dict() instead"
        )

    def add_param_group(self, param_group):
        raise RuntimeError(
            "MasterOptimizer.add_param_group is not supported: the parameters are fixed by the GradBuffer "
            "when the optimizer is built; pass per-group options as MasterOptimizer(..., param_groups=[...])"
        )

    def zero_grad(self, set_to_none=True):
        """Opens a new accumulation window in the GradBuffer (no memory is touched)."""
        self.buffer.start_window()

    def step(self, closure=None):
        """Steps the masters with the gradients in the buffer (parameters that received none in
        this window are skipped, as torch.optim skips .grad None), then refreshes the model.
        closure: as in torch.optim, re-evaluates the model (zero_grad, forward, backward) and
        returns the loss, which step returns; the model is refreshed from the masters before each
        evaluation, so optimizers that evaluate it several times (LBFGS) see their updates."""
        self.buffer.check_parameters()
        self.follow_changed_weights()
        if closure is None:
            self._attach_gradients()
            loss = self._step_wrapped_optimizer()
        else:

            def closure_with_gradients():
                self.refresh_model()
                with torch.enable_grad():
                    loss = closure()
                self._attach_gradients()
                return loss

            loss = self._step_wrapped_optimizer(closure_with_gradients)
        self.refresh_model()
        return loss

    def _attach_gradients(self):
        for p, master in self.masters:
            master.grad = p.main_grad if self.buffer.received_gradient(p) else None

    def _step_wrapped_optimizer(self, *closure):
        # Our step() already ran the step hooks (global ones included) around this call; the wrapped
        # optimizer's class step is wrapped by torch the same way, and going through that wrapper
        # would run the global hooks a second time, with the private optimizer as their argument.
        step = type(self.optimizer).step
        if getattr(step, "hooked", False):
            step = step.__wrapped__
        return step(self.optimizer, *closure)

    @torch.no_grad()
    def refresh_model(self):
        """Model parameters <- masters (cast to their dtype)."""
        if self._low_precision:
            torch._foreach_copy_([p for p, _ in self._low_precision], [m for _, m in self._low_precision])
        self._record_weights()

    # -- masters follow the weights ----------------------------------------------------------------
    # The masters are the truth the optimizer steps; the low-precision parameters are written from them. A
    # parameter changed by anything else after that (model.load_state_dict, an init function, an in-place edit
    # under torch.no_grad, a .data assignment) would be overwritten from stale masters by the next step, even
    # at lr 0. So the (version counter, data pointer) of every parameter is recorded whenever the optimizer has
    # stepped or written it, and a low-precision parameter that differs at the next step or state_dict() has its
    # master re-derived from it: the changed weights win, as they do in plain PyTorch. An in-place edit of
    # `parameter.data` bumps no version counter and keeps the pointer: call refresh_masters() after one.
    def _record_weights(self):
        # Every parameter of the buffer, fp32 ones (their own masters) and those a ZeRO-1 rank holds no piece of
        # included: whether the weights changed is also compared across data-parallel ranks (memengine.distributed).
        self._weights_written = {id(p): (p._version, p.data_ptr()) for p in self.buffer.params}

    def changed_weights(self):
        """The parameters changed (in place or by .data assignment) by anything but this optimizer since it last
        stepped or wrote them, in buffer order. Only the low-precision ones need their masters re-derived."""
        written = self._weights_written
        return [p for p in self.buffer.params if (p._version, p.data_ptr()) != written[id(p)]]

    def follow_changed_weights(self):
        """Re-derives the masters of changed_weights() from the parameters (no-op when none changed); returns
        how many changed."""
        changed = self.changed_weights()
        if changed:
            self.refresh_masters(changed)
        return len(changed)

    @torch.no_grad()
    def refresh_masters(self, params=None):
        """Masters <- the model's low-precision parameters (all, or those of `params`), upcast: after changing the
        weights in a way step() cannot see (an in-place edit of parameter.data). Optimizer state is kept."""
        chosen = None if params is None else {id(p) for p in params}
        for p, master in self._low_precision:
            if chosen is None or id(p) in chosen:
                master.copy_(self._master_part(p, master))
        self._record_weights()

    def _master_part(self, p, master):
        """The elements of p that `master` holds (all of them here; a ZeRO-1 piece overrides this)."""
        return p.detach()

    def state_dict(self):
        """torch's optimizer state dict of the wrapped optimizer ("state", "param_groups"; state
        dict hooks registered here run), plus "master_weights": a copy of the fp32 masters when the
        model has low-precision parameters (None otherwise)."""
        self.follow_changed_weights()
        state = super().state_dict()
        state[MASTER_WEIGHTS_KEY] = None if self.master_data is None else self._to_canonical(self.master_data)
        return state

    def _to_canonical(self, flat):
        """A copy of `flat` (laid out like the buffer) in the unbucketed layout a GradBuffer over the same
        parameters has without data parallelism, so that state dicts do not depend on the bucket layout."""
        offsets, total, _ = layout(self.buffer.params)
        if offsets == self.buffer.offsets and total == flat.numel():
            return flat.clone()
        canonical = torch.zeros(total, dtype=flat.dtype, device=flat.device)
        for p, here, there in zip(self.buffer.params, self.buffer.offsets, offsets, strict=True):
            canonical[there : there + p.numel()] = flat[here : here + p.numel()]
        return canonical

    def _from_canonical(self, canonical, flat):
        offsets, _, _ = layout(self.buffer.params)
        for p, here, there in zip(self.buffer.params, self.buffer.offsets, offsets, strict=True):
            flat[here : here + p.numel()] = canonical[there : there + p.numel()]

    def load_state_dict(self, state_dict):
        """Loads a state_dict() (optimizer state, options, masters) and refreshes the model from the
        masters."""
        state_dict = with_index_keys(state_dict)
        masters = state_dict.get(MASTER_WEIGHTS_KEY)
        if (masters is None) != (self.master_data is None):
            needs = "needs" if self.master_data is not None else "has no low-precision parameters and takes no"
            raise ValueError(
                f"MasterOptimizer.load_state_dict: this model {needs} master weights, but the state dict "
                f"{'has none' if masters is None else 'holds some'}; load a state dict saved from a model "
                "with the same parameter dtypes"
            )
        canonical_numel = layout(self.buffer.params)[1]
        if masters is not None and masters.numel() != canonical_numel:
            raise ValueError(
                f"MasterOptimizer.load_state_dict: master weights of {masters.numel()} elements do not fit "
                f"this buffer's {canonical_numel}; the state dict is from a different model"
            )
        super().load_state_dict(state_dict)
        if masters is not None:
            self._from_canonical(masters.to(self.master_data.device), self.master_data)
            self.refresh_model()
