"""Engine: one optimizer step over micro-batches, with gradients accumulated into a GradBuffer.

engine.step(batch, loss_fn) splits `batch` (a tensor, tuple/list or Mapping of tensors, e.g. a
transformers.BatchEncoding) along dim 0 into micro-batches; loss_fn(model, micro_batch) returns
(loss_sum, num_tokens) (memengine.causal_lm_loss for causal LMs, the default). Each
micro-batch's summed loss is backpropagated unscaled (times the fp16 loss scale), so the
buffer holds the sum of per-token gradients; the step then divides by the total token count
once, on the device, inside grad_stats_ (which also measures the norm and counts non-finite
values). The result equals the full-batch mean-loss gradient whatever the token count of each
micro-batch. Optional: a whole-step memory budget (a recompute plan applied to the model's
blocks at the first step so that the step's peak on the device fits it; see step_memory),
clipping, and for fp16 dynamic loss scaling (a step with a non-finite gradient is skipped and
the scale halved; it doubles after `growth_interval` good steps).

The loop itself never synchronises with the device; after it, step() reads the non-finite
count and the sign of the token total once (to decide whether to step) and returns device
tensors in its stats dict.

A live Engine registers itself, weakly, on its model (model._memengine_engines): unpatch(model)
refuses while one is alive, since it would release the GradBuffer the Engine accumulates into.
engine.close() (or deleting the Engine) lifts that.
"""

import numbers
import warnings
import weakref

import torch

from memengine.distributed import DEFAULT_BUCKET_BYTES
from memengine.distributed.data_parallel import DataParallel
from memengine.distributed.sharded_optimizer import SHARD_KEY, ShardedMasterOptimizer
from memengine.engine.batches import covers, shape_signature, split_batch
from memengine.engine.losses import causal_lm_loss, loss_path
from memengine.engine.step_memory import (
    MemoryReport,
    measure_step_peak,
    plan_step_memory,
    resident_tensors,
)
from memengine.grad import MasterOptimizer
from memengine.nn import patch
from memengine.segments import normalize_budget, repeated_blocks, segment
from memengine.segments.model import Segment

LIVE_ENGINES_ATTRIBUTE = "_memengine_engines"  # read by memengine.nn.unpatch


class Engine:
    """Trains `model` one optimizer step at a time over micro-batches, with fused fp32 gradient
    accumulation, fp32 master weights, token-count normalisation, clipping, loss scaling and an
    optional whole-step memory budget.

        engine = memengine.Engine(model, torch.optim.AdamW(model.parameters(), lr=3e-4), micro_batch_size=4)
        stats = engine.step(batch)  # a causal LM batch: memengine.causal_lm_loss is the default loss_fn

    Building it patches the model in place (memengine.patch: fused layers and one GradBuffer),
    builds engine.optimizer (a MasterOptimizer, a torch.optim.Optimizer) and registers the
    Engine on the model, which makes memengine.unpatch(model) refuse until engine.close() is
    called or the Engine is deleted. engine.state_dict() / load_state_dict() resume exactly.

    Args:
        model: a torch.nn.Module; its trainable parameters may be fp32, bf16 or fp16.
        optimizer: what steps the parameters' fp32 masters: a torch.optim.Optimizer class
            (torch.optim.AdamW), a callable taking an iterable of parameters and returning one
            (functools.partial(torch.optim.AdamW, lr=3e-4)), or an optimizer instance built over
            the model's parameters and not yet stepped (an optimizer of its type, with its param
            groups and options, is built over the masters; create learning-rate schedulers over
            engine.optimizer, not over the instance).
        micro_batch_size: rows per micro-batch; step() splits each batch into micro-batches of
            this many rows (the last may have fewer).
        max_norm: clip the gradient's global L2 norm to this (as torch.nn.utils.clip_grad_norm_);
            None: no clipping.
        loss_scale: "auto" (dynamic loss scaling when the model has fp16 parameters, none
            otherwise), a float (a static scale), or None (no scaling).
        initial_loss_scale, growth_interval: the dynamic scale starts at initial_loss_scale, halves
            on a step with a non-finite gradient (which is skipped) and doubles after
            growth_interval good steps in a row.
        budget: the whole-step peak (an int of bytes, a string such as "16GiB", or a share of the activations such
            as "50%": the predicted peak without recomputation less the other 50% of one micro-batch's
            activations, the demo's meaning too): the most bytes
            allocated on the model's device at any moment of one step(batch), i.e. parameters and
            buffers, gradient buffer, fp32 masters, optimizer state, the batch, one micro-batch's
            activations and gradients (the repeated blocks' and the others': embeddings, final
            norm, LM head, logits, loss) and temporaries, those of the optimizer step included.
            The first step, before its first micro-batch, measures the layers outside `blocks`
            on its first micro-batch (every block recomputed), predicts the optimizer state and
            step, profiles the blocks and applies the least-recompute plan whose predicted peak
            fits what is left (engine.segment_handle holds it; engine.memory_report() shows the
            breakdown). The plan covers batches no larger than the one it was made on (the same tensors,
            each no larger in any dimension); a later batch that it does not cover (longer sequences,
            more rows) is planned again before its first micro-batch, or given a plan made earlier for
            a batch that covers it, so every step fits the budget. A budget at or above the
            no-recompute peak recomputes nothing and says so once (a warning with the numbers); one
            below the smallest feasible peak raises
            ValueError naming it, before any parameter changes. None: no recomputation.
            (memengine.segment(blocks, budget=...) keeps its meaning: the blocks' activations.)
        blocks: the modules the budget plans over (default: the model's largest nn.ModuleList
            of same-type modules, e.g. a Hugging Face model's layers).
        measure_memory: measure every step's whole-step peak (engine.memory_report() shows the
            last one next to the prediction, which is then made at the first step even without a
            budget). On CUDA it reads and resets the allocator's peak statistics and synchronises
            before and after the step; on CPU it runs the step under the PyTorch profiler (slow).
        param_groups: optional per-group options, as torch.optim takes them, over the model's
            parameters (see MasterOptimizer); not with an optimizer instance, which has its own.
        process_group: data parallelism over this torch.distributed process group (e.g.
            torch.distributed.group.WORLD under torchrun); None: this process trains alone. Each
            rank steps on its own batch; the step's gradient is the mean over every token of every
            rank. Rank 0's parameters and buffers are broadcast when the Engine is built. The
            gradient buffer is reduced in buckets (fp32 SUM) launched during the last micro-batch's
            backward as they complete (micro-batches before it communicate nothing); see
            memengine.distributed.
        shard: ZeRO-1: each rank keeps fp32 masters and optimizer state for its shard of every
            bucket only (reduce-scatter, then an all-gather of the updated parameters). Default:
            True with a process_group. Needs an elementwise optimizer (SGD, Adam, AdamW, ...).
        bucket_bytes: gradient bytes per bucket (default memengine.distributed.DEFAULT_BUCKET_BYTES,
            32 MiB); smaller buckets start communicating earlier in the backward.
        overlap: launch each bucket during the backward as soon as it is complete (the contribution
            count per parameter is learned on the first step and checked after); False: reduce only
            after the backward (for models whose graph changes from step to step).
    """

    def __init__(
        self,
        model,
        optimizer,
        micro_batch_size,
        max_norm=None,
        loss_scale="auto",
        initial_loss_scale=2.0**16,
        growth_interval=2000,
        budget=None,
        blocks=None,
        param_groups=None,
        measure_memory=False,
        process_group=None,
        shard=None,
        bucket_bytes=None,
        overlap=True,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"Engine: micro_batch_size must be at least 1, got {micro_batch_size}")
        self.budget = normalize_budget(budget)
        self.blocks = blocks
        self.segment_handle = None
        self.measure_memory = measure_memory
        self.memory_plan = None  # the step_memory.StepMemoryPlan in use, made at the first step
        self._planned_signature = None  # the batch shapes memory_plan was made for (batches.shape_signature)
        self._plans = {}  # every plan made so far: shape signature -> (signature, StepMemoryPlan)
        self._loss_path = None  # what the last step's loss went through (losses.loss_path)
        self._restored_plan = None  # the plan of a loaded state dict made with the same budget
        self._measured_peak = None  # (step number, bytes) of the last measured step
        self._steps = 0
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.max_norm = max_norm
        self.data_parallel = None
        if process_group is None:
            if shard:
                raise ValueError("Engine: shard=True (ZeRO-1) needs a process_group to shard over")
            _warn_if_distributed_without_group()
            self.buffer = patch(model)
        else:
            world = torch.distributed.get_world_size(process_group)
            bucket_bytes = DEFAULT_BUCKET_BYTES if bucket_bytes is None else bucket_bytes
            self.buffer = patch(model, bucket_bytes=bucket_bytes, bucket_multiple=world)
            shard = True if shard is None else shard
            self.data_parallel = DataParallel(self.buffer, process_group, shard=shard, overlap=overlap)
            self.data_parallel.broadcast_model(model)
        self.buffer.check_coverage()  # a model patched earlier may have gained trainable parameters since
        if self.data_parallel is not None and shard:
            self.optimizer = MasterOptimizer(
                optimizer, self.buffer, param_groups=param_groups, shard=True, process_group=process_group
            )
        else:
            self.optimizer = MasterOptimizer(optimizer, self.buffer, param_groups=param_groups)
        has_fp16 = any(p.dtype == torch.float16 for p in self.buffer.params)
        self.dynamic_loss_scale = loss_scale == "auto" and has_fp16
        if loss_scale == "auto":
            loss_scale = initial_loss_scale if has_fp16 else None
        self.loss_scale = float(loss_scale) if loss_scale is not None else 1.0
        self.growth_interval = growth_interval
        self._good_steps = 0
        self._closed = False
        model.__dict__.setdefault(LIVE_ENGINES_ATTRIBUTE, _LiveEngines()).add(self)

    def __repr__(self):
        state = "closed" if self._closed else "live"
        return (
            f"<memengine.Engine ({state}) of a {type(self.model).__name__}, micro_batch_size={self.micro_batch_size}>"
        )

    def close(self):
        """Detaches the Engine from its model: memengine.unpatch(model) is allowed afterwards and
        step() is refused. The model stays patched (and any recompute plan applied). Idempotent."""
        live = self.model.__dict__.get(LIVE_ENGINES_ATTRIBUTE)
        if live is not None:
            live.discard(self)
        self._closed = True

    def step(self, batch, loss_fn=None):
        """One optimizer step over `batch`; returns its statistics.

        batch: a tensor, a tuple or list, or any Mapping (dict, transformers.BatchEncoding) of
        tensors, nested freely. Every tensor is split along dim 0 into micro-batches of
        micro_batch_size rows, of the batch's own container types (a Mapping that cannot be
        built from a dict becomes a dict); a Mapping's non-tensor values (None, numbers) go to
        every micro-batch unchanged. All tensors must have the same number of rows (ValueError
        naming each key's row count otherwise, before any forward).

        loss_fn(model, micro_batch) -> (loss_sum, num_tokens): the micro-batch's loss SUMMED over
        its tokens (a one-element tensor that requires grad) and how many tokens that sum is over
        (a Python number or a one-element tensor; tensors stay on the device). The step's
        gradient is that of sum(loss_sum) / sum(num_tokens) over the micro-batches, the
        full-batch mean loss, however the tokens fall into micro-batches. Default (None):
        memengine.causal_lm_loss, for Hugging Face-style causal LMs with labels (-100: ignored).
        A bare tensor, a model output (whose .loss is a mean) or a loss without grad are refused
        with the fix. A mean loss returned with its token count is not detectable and is wrong:
        the reported loss is divided by the token count twice (e.g. 62x too small with 62 tokens)
        and micro-batches are weighted equally, not by their token counts.

        A step whose token counts sum to 0 (every label -100) has no mean loss: it raises ValueError and
        leaves nothing behind (the next step trains as if it had not happened). With data parallelism a
        step that raises on one rank raises on every rank (memengine.distributed.StepFailedOnAnotherRank
        on the others; docs/data-parallel.md), so a loop may catch the errors and go on, on every rank.

        Returns a dict: "loss" (fp32 0-dim device tensor: the batch's mean loss, sum of loss_sum
        over sum of num_tokens), "grad_norm" (fp32 device tensor: the gradient's L2 norm before
        clipping), "tokens" (fp64 device tensor: the total token count), "skipped" (bool: True
        when the gradient had a non-finite value and no step was taken) and "loss_scale" (float:
        the loss scale after this step).
        """
        if self._closed:
            raise RuntimeError("Engine.step: this Engine was closed (engine.close()); build a new Engine to train")
        if loss_fn is None:
            loss_fn = causal_lm_loss
        # Counted before anything can raise: a step that fails is still a step every rank took (the step
        # number is what data-parallel ranks compare to know they are combining the same step).
        self._steps += 1
        if not self.measure_memory:
            return self._step(batch, loss_fn)
        resident = resident_tensors(self.model, self.buffer, self.optimizer, batch)
        stats, peak = measure_step_peak(lambda: self._step(batch, loss_fn), self.buffer.data.device, resident)
        self._measured_peak = (self._steps, peak)
        return stats

    def _plan_memory(self, batch, micro_batches, loss_fn):
        """The whole-step memory plan (see `budget`) for this batch's shapes, before its first micro-batch: the
        plan in use when it covers them (every tensor no larger), else a plan made earlier for shapes that cover
        them (applied again), else a new plan made on this batch."""
        signature = shape_signature(batch)
        if self.memory_plan is not None and covers(self._planned_signature, signature):
            return
        cached = next((planned for known, planned in self._plans.items() if covers(known, signature)), None)
        if self.segment_handle is not None:
            self.segment_handle.remove()
        blocks = self.blocks if self.blocks is not None else repeated_blocks(self.model)
        if cached is not None:
            signature, self.memory_plan = cached
            if any(s.policy != "keep" for s in self.memory_plan.plan):
                self.memory_plan.handle = segment(blocks, plan=self.memory_plan.plan)
                self.memory_plan.handle.chain = self.memory_plan.chain
        else:
            self.memory_plan = plan_step_memory(
                self.model,
                self.buffer,
                self.optimizer,
                blocks,
                self.budget,
                sample=lambda: loss_fn(self.model, micro_batches[0]),
                batch=batch,
                plan=self._restored_plan,
            )
            self._restored_plan = None  # a resumed run's plan is for the shapes it was first made for
            self._plans[signature] = (signature, self.memory_plan)
        self._planned_signature = signature
        self.segment_handle = self.memory_plan.handle

    def memory_report(self, batch=None, loss_fn=None):
        """The whole-step memory breakdown (a step_memory.MemoryReport; print it for a table):
        parameters, gradient buffer, masters, optimizer state, batch, non-repeated and block
        activations under the plan, optimizer step temporaries, the predicted peak, the budget, the
        plan, and the measured peak of the last step when measure_memory is on. The prediction is
        made at the first step when there is a budget or measure_memory; otherwise pass a `batch`
        (and loss_fn) to predict it now (no recomputation): that runs one micro-batch's forward
        and backward, and is refused while a step's gradients are being accumulated elsewhere."""
        if self.memory_plan is None:
            if batch is None:
                raise ValueError(
                    "Engine.memory_report: no prediction yet (it is made at the first step when the Engine has a "
                    "budget or measure_memory=True); pass a batch: engine.memory_report(batch, loss_fn)"
                )
            micro_batches = split_batch(batch, self.micro_batch_size)
            loss_fn = loss_fn if loss_fn is not None else causal_lm_loss
            self._loss_path = loss_path(loss_fn, self.model)
            self._plan_memory(batch, micro_batches, loss_fn)
        step, peak = self._measured_peak if self._measured_peak is not None else (None, None)
        return MemoryReport.from_plan(self.memory_plan, measured_peak=peak, measured_step=step, loss=self._loss_path)

    def _step(self, batch, loss_fn):
        self._loss_path = loss_path(loss_fn, self.model)
        data_parallel = self.data_parallel
        try:
            micro_batches = split_batch(batch, self.micro_batch_size)
            if self.budget is not None or self.measure_memory:
                self._plan_memory(batch, micro_batches, loss_fn)
            loss_total, tokens_total = self._accumulate(micro_batches, loss_fn)
        except BaseException as error:
            if data_parallel is not None:  # the other ranks raise too instead of waiting for this one
                data_parallel.abandon(self._steps, error)
            raise
        return self._update(loss_total, tokens_total)

    def _accumulate(self, micro_batches, loss_fn):
        """Forward and backward of every micro-batch into the buffer (data-parallel: reduced over the ranks);
        returns the (loss sum, token count) of the step, fp64 device tensors (global with data parallelism)."""
        device = self.buffer.data.device
        self.optimizer.zero_grad()
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        tokens_total = torch.zeros((), dtype=torch.float64, device=device)
        # Counts given as Python numbers are summed on the host and added once: making a device
        # tensor of each would be a blocking host-to-device copy per micro-batch.
        host_tokens = 0
        data_parallel = self.data_parallel
        for index, micro_batch in enumerate(micro_batches):
            loss_sum, num_tokens = _checked_loss_result(loss_fn(self.model, micro_batch))
            loss_total += loss_sum.detach().reshape(()).to(torch.float64)
            if isinstance(num_tokens, torch.Tensor):
                tokens_total += num_tokens.detach().reshape(()).to(device=device, dtype=torch.float64)
            else:
                host_tokens += num_tokens  # Python ints stay exact
            if data_parallel is not None and index == len(micro_batches) - 1:
                tokens_total += float(host_tokens)
                host_tokens = 0
                data_parallel.last_backward(loss_total, tokens_total)  # starts the global token count
            (loss_sum * self.loss_scale if self.loss_scale != 1.0 else loss_sum).backward()
        if data_parallel is not None:
            return data_parallel.finish()
        return loss_total, tokens_total + float(host_tokens)  # a scalar kernel argument, not a copy

    def _update(self, loss_total, tokens_total):
        """Scales, measures and clips the step's gradient and steps the optimizer unless it is not finite."""
        data_parallel = self.data_parallel
        # Checked on the device, before the buffer is scaled: with no tokens (all labels -100, common in packed
        # fine-tuning data) 1/tokens is inf, and 0 x inf would fill the whole buffer with NaN (alignment gaps and
        # bucket padding too, which no later window overwrites): every later step would be skipped. Such a step
        # scales by 1 instead, so it leaves nothing behind, and raises below.
        has_tokens = (tokens_total > 0) & torch.isfinite(tokens_total)
        scale = 1.0 / (tokens_total * self.loss_scale)
        scale = torch.where(has_tokens, scale, torch.ones_like(scale)).to(torch.float32)
        if data_parallel is None:
            self.buffer.finish_window()
            stats = self.buffer.stats(scale)  # buffer /= tokens * loss scale; [norm, non-finite]
            if self.max_norm is not None:
                self.buffer.clip_(stats, self.max_norm)
        else:
            # The same over the reduced gradient of all ranks; raises on every rank when the ranks disagree.
            stats = data_parallel.stats(scale, self._steps, weights_changed=bool(self.optimizer.changed_weights()))
            if self.max_norm is not None:
                data_parallel.clip_(stats, self.max_norm)
        # The one host synchronisation of the step.
        skipped, no_tokens = torch.stack([stats[1] > 0, ~has_tokens]).tolist()
        if no_tokens:
            raise ValueError(
                f"Engine.step: loss_fn's token counts sum to {tokens_total.item():g} over the batch, so there is "
                "no mean loss to step on (were all labels -100?); nothing was stepped, and the next step starts "
                "afresh"
            )
        if skipped:
            if self.dynamic_loss_scale:
                self.loss_scale = max(self.loss_scale / 2, 1.0)
                self._good_steps = 0
        else:
            self.optimizer.step()
            if self.dynamic_loss_scale:
                self._good_steps += 1
                if self._good_steps % self.growth_interval == 0:
                    self.loss_scale *= 2
        return {
            "loss": (loss_total / tokens_total).to(torch.float32),
            "grad_norm": stats[0],
            "tokens": tokens_total,
            "skipped": skipped,
            "loss_scale": self.loss_scale,
        }

    def state_dict(self):
        """Everything a step depends on: the model's parameters and buffers, the optimizer (with
        the fp32 masters), the loss-scaling state and the step count. Loading it into an Engine
        built the same way continues bit-identically. With shard=True the optimizer part is this
        rank's shard (save one file per rank; it loads on the same rank of the same world size);
        consolidated_state_dict() gives one that any world size loads."""
        return self._state_dict_with(self.optimizer.state_dict())

    def consolidated_state_dict(self):
        """state_dict() with the optimizer state and masters of every rank gathered, as a single-process
        Engine has them: loadable by an Engine on any number of ranks, sharded or not, or by a
        single-process Engine. With shard=True it is a collective: every rank calls it (each gets
        the whole dict; save it from rank 0)."""
        consolidated = getattr(self.optimizer, "consolidated_state_dict", self.optimizer.state_dict)
        return self._state_dict_with(consolidated())

    def _state_dict_with(self, optimizer_state):
        return {
            "model": self.model.state_dict(),
            "optimizer": optimizer_state,
            "loss_scale": self.loss_scale,
            "good_steps": self._good_steps,
            "steps": self._steps,
            "plan": None
            if self.memory_plan is None
            else {
                "budget": self.budget,
                "segments": [(segment.start, segment.end, segment.policy) for segment in self.memory_plan.plan],
            },
        }

    def load_state_dict(self, state_dict):
        """Loads state_dict() or consolidated_state_dict() (with shard=True a collective: every rank calls it).
        A ZeRO-1 shard of another rank or world size raises ValueError before anything changes. Optimizer
        state keyed by strings, as torch.distributed.checkpoint returns it, is taken by index."""
        optimizer_state = state_dict["optimizer"]
        if SHARD_KEY in optimizer_state and not isinstance(self.optimizer, ShardedMasterOptimizer):
            saved = optimizer_state[SHARD_KEY]
            raise ValueError(
                f"Engine.load_state_dict: the optimizer state is the ZeRO-1 shard of rank {saved['rank']} of "
                f"{saved['world']} (a state_dict() of an Engine with shard=True), which loads only on that rank of "
                "that world size; this Engine is not sharded. Save consolidated_state_dict() instead (any "
                "Engine loads it)"
            )
        # The optimizer first: it refuses a shard of another layout before the model changes.
        self.optimizer.load_state_dict(optimizer_state)
        self.model.load_state_dict(state_dict["model"])
        self.optimizer.refresh_model()  # the masters, not the low-precision parameters they round to, win
        self.loss_scale = state_dict["loss_scale"]
        self._good_steps = state_dict["good_steps"]
        self._steps = state_dict.get("steps", self._steps)
        self._restore_plan(state_dict.get("plan"))

    def _restore_plan(self, saved):
        """A plan saved with the same budget is applied again at the next step (with its prediction) instead
        of being chosen afresh from new measurements, which could pick another one; recomputation does not
        change the numbers, only the memory, so another budget plans anew."""
        if saved is None or saved["budget"] != self.budget or self.budget is None:
            return
        self._restored_plan = [Segment(*segment) for segment in saved["segments"]]
        if self.memory_plan is not None:  # planned already in this process: plan again at the next step
            if self.segment_handle is not None:
                self.segment_handle.remove()
            self.memory_plan = self.segment_handle = self._planned_signature = None
            self._plans = {}


def _warn_if_distributed_without_group():
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized() and distributed.get_world_size() > 1:
        warnings.warn(
            f"memengine.Engine: torch.distributed is initialised with {distributed.get_world_size()} ranks but the "
            "Engine has no process_group, so each rank trains its own copy of the model on its own data. For data "
            "parallelism pass process_group=torch.distributed.group.WORLD",
            stacklevel=3,
        )


class _LiveEngines:
    """The live Engines of a model, held weakly (an Engine that is deleted drops out). A deep copy
    or a pickle of the model starts with none: the Engines train the original."""

    def __init__(self):
        self._engines = weakref.WeakSet()

    def add(self, engine):
        self._engines.add(engine)

    def discard(self, engine):
        self._engines.discard(engine)

    def __iter__(self):
        return iter(list(self._engines))

    def __deepcopy__(self, memo):
        return _LiveEngines()

    def __reduce__(self):
        return (_LiveEngines, ())


def _checked_loss_result(result):
    """loss_fn's (loss_sum, num_tokens), or an error that says what loss_fn must return. Checks
    types and shapes only: nothing here reads a device value."""
    expected = (
        "loss_fn(model, micro_batch) must return (summed loss, number of tokens): the loss summed over the "
        "micro-batch's tokens and how many tokens it sums, as memengine.causal_lm_loss does for causal LMs"
    )
    if isinstance(result, torch.Tensor):
        raise TypeError(
            f"Engine.step: loss_fn returned a bare tensor of shape {tuple(result.shape)} (a mean loss?); {expected}"
        )
    if not isinstance(result, (tuple, list)) and hasattr(result, "loss"):
        raise TypeError(
            f"Engine.step: loss_fn returned a {type(result).__name__}; its .loss (a model output's output.loss) "
            "is a mean over the micro-batch's tokens, but the Engine weights micro-batches by their token counts "
            f"and needs (summed loss, number of tokens). {expected} (return memengine.causal_lm_loss(model, "
            "micro_batch), or (output.loss * n, n) with n the number of tokens the mean is over)"
        )
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        count = f" of {len(result)} values" if isinstance(result, (tuple, list)) else ""
        raise TypeError(f"Engine.step: loss_fn returned a {type(result).__name__}{count}; {expected}")
    loss_sum, num_tokens = result
    if not isinstance(loss_sum, torch.Tensor):
        raise TypeError(
            f"Engine.step: loss_fn returned a loss of type {type(loss_sum).__name__} (after .item()?); {expected}, "
            "the loss a tensor that requires grad"
        )
    if loss_sum.numel() != 1:
        raise ValueError(
            f"Engine.step: loss_fn returned a loss of shape {tuple(loss_sum.shape)}; return its sum over the "
            "micro-batch's tokens (a one-element tensor) together with the number of tokens"
        )
    if not loss_sum.requires_grad:
        raise RuntimeError(
            "Engine.step: loss_fn returned a loss that does not require grad: it was computed under torch.no_grad() "
            "or torch.inference_mode(), or detached, or the model has no trainable parameter it depends on; "
            "compute it with gradients enabled"
        )
    if isinstance(num_tokens, torch.Tensor):
        if num_tokens.numel() != 1:
            raise ValueError(
                f"Engine.step: loss_fn returned num_tokens of shape {tuple(num_tokens.shape)}; "
                "return one count per micro-batch (a number or a one-element tensor)"
            )
    elif isinstance(num_tokens, numbers.Real):
        if num_tokens < 0:
            raise ValueError(
                f"Engine.step: loss_fn returned a token count of {num_tokens}; num_tokens counts the tokens the "
                "loss sums over and cannot be negative"
            )
    else:
        raise TypeError(
            f"Engine.step: loss_fn must return (loss_sum, num_tokens) with num_tokens a number or a "
            f"tensor, got num_tokens of type {type(num_tokens).__name__}"
        )
    return loss_sum, num_tokens
