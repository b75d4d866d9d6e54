"""Hugging Face Trainer integration: one added line.

    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    memengine.integrations.transformers.prepare(trainer)
    trainer.train()

prepare(trainer) patches trainer.model in place (memengine.patch: fused layers accumulate weight
gradients straight into one fp32 GradBuffer, other parameters are folded into it by hooks) and
makes the optimizer Trainer builds (its default AdamW with its weight-decay groups, args.optim,
optimizer_cls_and_kwargs, or the instance passed as optimizers=) step fp32 master weights
through memengine.MasterOptimizer. Everything else is Trainer's own and keeps working because the
buffer behaves like .grad: gradient_accumulation_steps (micro-batches add into the buffer;
model.zero_grad() after each optimizer step opens a new window), max_grad_norm (clip_grad_norm_
sees the buffer's fp32 gradients through .grad, so the logged grad_norm is the buffer's norm),
learning-rate schedulers (created over the MasterOptimizer), checkpoints (the optimizer's state
dict carries the masters, so resume_from_checkpoint continues exactly), calling train() again (it
goes on with the same masters and optimizer state under a new schedule, as Trainer goes on with
its optimizer) and activation_checkpointing / gradient_checkpointing. Or, instead of Trainer's
checkpointing, prepare(trainer, budget="12GiB") has memengine's planner fit the whole training step into that
many bytes, as memengine.Engine(budget=) does: at the first training forward it measures one
micro-batch, predicts the optimizer step and applies the least-recompute plan of the model's
repeated blocks that fits (preparation.memory_report() shows the breakdown).

What a bf16 model saves: with bf16 parameters the usual recipe keeps bf16 gradients plus fp32
master weights and an fp32 copy of the gradients at the step (20 bytes per parameter with AdamW);
here the fp32 buffer is the only gradient (18 bytes per parameter), and micro-batches accumulate
in fp32 rather than bf16.

Configurations the buffer cannot serve are refused by prepare() with the reason: several
processes (DDP, FSDP, DeepSpeed: they reduce or shard .grad, not the buffer), fp16 loss scaling
with low-precision parameters, model_init (Trainer would build a new, unpatched model).
"""

import functools

import torch
import transformers
from accelerate.optimizer import AcceleratedOptimizer

from memengine.engine.losses import causal_lm_loss, language_model_parts
from memengine.engine.step_memory import MemoryReport, plan_step_memory
from memengine.grad import MasterOptimizer
from memengine.nn import patch
from memengine.segments import normalize_budget, repeated_blocks

_PREPARED_ATTRIBUTE = "_memengine_preparation"


class Preparation:
    """What prepare() did to a Trainer: .buffer (the GradBuffer), .optimizer (the MasterOptimizer,
    once Trainer has built it), .budget and .memory_plan (the whole-step plan, after the first
    training forward when there is a budget)."""

    def __init__(self, buffer, budget, blocks):
        self.buffer, self.budget, self.blocks = buffer, budget, blocks
        self.optimizer = None
        self.memory_plan = None
        self.loss_path = None  # which loss the last training micro-batch took (see _compute_loss)
        self._planning = False  # the planner's sample calls the model again: the hook must not plan twice
        self.planning_hook = None  # removed once the plan is made: later forwards pay nothing

    def memory_report(self):
        """The whole-step memory breakdown and prediction (memengine.engine.step_memory.MemoryReport)."""
        if self.memory_plan is None:
            raise ValueError(
                "memory_report: the plan is made at the first training forward of prepare(trainer, budget=)"
            )
        return MemoryReport.from_plan(self.memory_plan)

    def plan_at_first_training_forward(self, model, args, kwargs):
        """Forward pre-hook on the model: plans the step's memory with this very micro-batch (when the loss is
        the model's own; the fused loss plans from Trainer.compute_loss, see plan)."""
        if self._planning or not (model.training and torch.is_grad_enabled()):
            return

        def sample():
            loss = model(*args, **kwargs).loss
            if loss is None:
                raise ValueError(
                    "prepare(trainer, budget=): the model returned no .loss for the training batch; the planner "
                    "measures a micro-batch through the model's own loss (pass labels)"
                )
            return loss, 1

        self.plan(model, sample, (args, kwargs))

    def plan(self, model, sample, batch):
        """Plans the step's memory (prepare(trainer, budget=)) once, measuring `sample` (a zero-argument call of
        the micro-batch's loss as training computes it); a no-op without a budget or once planned."""
        if self.budget is None or self.memory_plan is not None or self._planning:
            return
        if self.optimizer is None:
            raise RuntimeError(
                "prepare(trainer, budget=): the model ran a training forward before Trainer built its optimizer"
            )
        blocks = self.blocks if self.blocks is not None else repeated_blocks(model)
        self._planning = True
        try:
            self.memory_plan = plan_step_memory(model, self.buffer, self.optimizer, blocks, self.budget, sample, batch)
        finally:
            self._planning = False
        self.planning_hook.remove()


def prepare(trainer, *, budget=None, blocks=None):
    """Makes `trainer` (a transformers.Trainer, or a subclass such as trl's SFTTrainer) train
    its model with memengine; call it after building the Trainer and before train(). Returns a
    Preparation (.buffer, .optimizer, .memory_report()).

    budget: None (the default: Trainer's activation_checkpointing, if set, stays in charge), or
    the whole training step's peak in bytes (an int, or a string such as "12GiB"; see
    memengine.Engine): the model's repeated blocks (`blocks`, default its largest list of
    same-type modules) get the least-recompute plan that fits, chosen at the first training
    forward. ValueError there, naming the smallest feasible budget, when none fits. The
    prediction counts the micro-batch being trained, not the rest of the step's micro-batches
    that Trainer fetches ahead nor Trainer's own bookkeeping: measured over whole Trainer runs
    (small GPT-2) the peak came out 0.1 % to 2.4 % above it, so leave a few percent of margin.

    Raises ValueError or RuntimeError, before changing anything, for the configurations listed in
    the module docstring, for a budget together with Trainer's activation checkpointing, and when
    called twice."""
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"prepare: expected a transformers.Trainer, got {type(trainer).__name__}")
    if getattr(trainer, _PREPARED_ATTRIBUTE, None) is not None:
        raise RuntimeError("prepare: this Trainer was already prepared by memengine")
    _refuse_unsupported(trainer, budget)
    buffer = patch(trainer.model)
    buffer.check_coverage()  # a model patched earlier may have gained trainable parameters since
    preparation = Preparation(buffer, normalize_budget(budget), blocks)
    setattr(trainer, _PREPARED_ATTRIBUTE, preparation)
    if trainer.optimizer is not None:  # passed as Trainer(optimizers=(optimizer, None))
        trainer.optimizer = preparation.optimizer = _over_masters(trainer.optimizer, buffer)
    build_optimizer = trainer.create_optimizer  # the Trainer's own (or its subclass's) method

    def create_optimizer(model=None):
        optimizer = build_optimizer(model)
        preparation.optimizer = _over_masters(optimizer, buffer)
        # A later train() gets back the optimizer of the first one, which accelerate has wrapped around
        # the MasterOptimizer: it stays as it is (accelerate recognizes its own wrapper and does not wrap
        # it again), so training continues with the same masters and optimizer state, as a plain
        # Trainer continues with its optimizer.
        if _without_accelerate_wrapper(optimizer) is not preparation.optimizer:
            trainer.optimizer = preparation.optimizer
        return trainer.optimizer

    # An instance attribute: create_optimizer_and_scheduler calls self.create_optimizer() and then
    # builds the scheduler over self.optimizer, which is by then the MasterOptimizer (or, from the
    # second train() on, accelerate's wrapper around it, whose param_groups are the MasterOptimizer's).
    trainer.create_optimizer = create_optimizer
    trainer.compute_loss = functools.partial(_compute_loss, trainer, preparation, trainer.compute_loss)
    if preparation.budget is not None:
        preparation.planning_hook = trainer.model.register_forward_pre_hook(
            preparation.plan_at_first_training_forward, with_kwargs=True
        )
    return preparation


def _compute_loss(trainer, preparation, compute_loss, model, inputs, return_outputs=False, num_items_in_batch=None):
    """Trainer.compute_loss through memengine.causal_lm_loss's fused linear + cross-entropy (no logits) for the
    causal LMs it recognises, with Hugging Face's value: the summed token loss over num_items_in_batch when
    Trainer passes it (the model's own loss_kwargs semantics), else the mean over the micro-batch's tokens.
    Trainer's own path for everything else: outputs wanted, a label smoother or compute_loss_func, no labels,
    evaluation, or a model causal_lm_loss does not recognise (preparation.loss_path says which ran last)."""
    unwrapped = trainer.accelerator.unwrap_model(model)
    fused = (
        not return_outputs
        and model.training
        and torch.is_grad_enabled()
        and trainer.label_smoother is None
        and trainer.compute_loss_func is None
        and "labels" in inputs
        and language_model_parts(unwrapped) is not None
    )
    if not fused:
        preparation.loss_path = "the model's own loss"
        return compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
    preparation.loss_path = "fused linear cross-entropy"
    preparation.plan(unwrapped, lambda: causal_lm_loss(unwrapped, inputs), inputs)  # the first time, with a budget
    loss_sum, count = causal_lm_loss(unwrapped, inputs)
    if num_items_in_batch is not None and trainer.model_accepts_loss_kwargs:
        return loss_sum / num_items_in_batch
    return loss_sum / count


def _over_masters(optimizer, buffer):
    """The MasterOptimizer that steps `optimizer` (as Trainer built it, or was given it) through buffer's
    fp32 masters: the one inside it when it already is one, or is accelerate's wrapper around one."""
    optimizer = _without_accelerate_wrapper(optimizer)
    if isinstance(optimizer, MasterOptimizer):
        if optimizer.buffer is not buffer:
            raise ValueError("prepare: the MasterOptimizer passed to the Trainer steps another model's GradBuffer")
        return optimizer
    return MasterOptimizer(optimizer, buffer)


def _without_accelerate_wrapper(optimizer):
    """The optimizer inside accelerate's AcceleratedOptimizer, which Trainer's train() puts around its
    optimizer and keeps in trainer.optimizer afterwards."""
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def _refuse_unsupported(trainer, budget):
    args = trainer.args
    why = None
    if budget is not None and (args.activation_checkpointing or args.gradient_checkpointing):
        why = (
            "a budget together with activation_checkpointing/gradient_checkpointing: both would recompute the "
            "blocks; choose memengine's budget (it plans the recomputation) or Trainer's checkpointing"
        )
    elif args.world_size > 1:
        why = (
            f"it runs {args.world_size} processes; Trainer's data parallelism (DDP/FSDP) reduces .grad, not "
            "memengine's GradBuffer, and memengine's data parallelism (memengine.Engine(model, ..., "
            "process_group=...), docs/data-parallel.md) drives its own training loop, not Trainer's"
        )
    elif getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        why = "DeepSpeed and FSDP manage the gradients themselves, bypassing memengine's GradBuffer"
    elif trainer.model_init is not None:
        why = "with model_init, Trainer builds a new model at train() that memengine has not patched"
    elif args.fp16 and any(p.dtype != torch.float32 for p in trainer.model.parameters() if p.requires_grad):
        why = (
            "fp16=True with bf16/fp16 parameters: Trainer's loss scaler unscales the optimizer's master "
            "gradients before memengine attaches them; keep the parameters in fp32 for fp16 autocast, or use "
            "bf16, or memengine.Engine (dynamic loss scaling)"
        )
    elif trainer.lr_scheduler is not None and not isinstance(trainer.optimizer, MasterOptimizer):
        why = (
            "a learning-rate scheduler was passed with a plain optimizer (optimizers=(optimizer, scheduler)); "
            "the scheduler would drive an optimizer that no longer steps anything. Pass optimizers=(optimizer, "
            "None) and let Trainer build the scheduler, or build the scheduler over memengine.MasterOptimizer"
        )
    if why is not None:
        raise RuntimeError(f"memengine.integrations.transformers.prepare: cannot train this Trainer: {why}")
