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
dict carries the masters, so resume_from_checkpoint continues exactly) and
activation_checkpointing / gradient_checkpointing.

What a bf16 model saves: with bf16 parameters the usual recipe keeps bf16 gradients plus fp32
master weights and an fp32 copy of the gradients at the step (20 bytes per parameter with AdamW);
here the fp32 buffer is the only gradient (18 bytes per parameter), and micro-batches accumulate
in fp32 rather than bf16.

Configurations the buffer cannot serve are refused by prepare() with the reason: several
processes (DDP, FSDP, DeepSpeed: they reduce or shard .grad, not the buffer), fp16 loss scaling
with low-precision parameters, model_init (Trainer would build a new, unpatched model).
"""

import torch
import transformers

from memengine.grad import MasterOptimizer
from memengine.nn import patch

_PREPARED_ATTRIBUTE = "_memengine_buffer"


def prepare(trainer):
    """Makes `trainer` (a transformers.Trainer, or a subclass such as trl's SFTTrainer) train
    its model with memengine; call it after building the Trainer and before train(). Returns the
    GradBuffer. Raises ValueError or RuntimeError, before changing anything, for the
    configurations listed in the module docstring and when called twice."""
    if not isinstance(trainer, transformers.Trainer):
        raise TypeError(f"prepare: expected a transformers.Trainer, got {type(trainer).__name__}")
    if getattr(trainer, _PREPARED_ATTRIBUTE, None) is not None:
        raise RuntimeError("prepare: this Trainer was already prepared by memengine")
    _refuse_unsupported(trainer)
    buffer = patch(trainer.model)
    buffer.check_coverage()  # a model patched earlier may have gained trainable parameters since
    setattr(trainer, _PREPARED_ATTRIBUTE, buffer)
    if trainer.optimizer is not None:  # passed as Trainer(optimizers=(optimizer, None))
        trainer.optimizer = _over_masters(trainer.optimizer, buffer)
    build_optimizer = trainer.create_optimizer  # the Trainer's own (or its subclass's) method

    def create_optimizer(model=None):
        optimizer = build_optimizer(model)
        trainer.optimizer = _over_masters(optimizer, buffer)
        return trainer.optimizer

    # An instance attribute: create_optimizer_and_scheduler calls self.create_optimizer() and then
    # builds the scheduler over self.optimizer, which is by then the MasterOptimizer.
    trainer.create_optimizer = create_optimizer
    return buffer


def _over_masters(optimizer, buffer):
    if isinstance(optimizer, MasterOptimizer):
        if optimizer.buffer is not buffer:
            raise ValueError("prepare: the MasterOptimizer passed to the Trainer steps another model's GradBuffer")
        return optimizer
    return MasterOptimizer(optimizer, buffer)


def _refuse_unsupported(trainer):
    args = trainer.args
    why = None
    if args.world_size > 1:
        why = (
            f"it runs {args.world_size} processes; Trainer's data parallelism (DDP/FSDP) reduces .grad, not "
            "memengine's GradBuffer, and memengine's own data parallelism is not available yet"
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
