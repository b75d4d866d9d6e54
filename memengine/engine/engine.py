"""Engine: one optimizer step over micro-batches, with gradients accumulated into a GradBuffer.

engine.step(batch, loss_fn) splits `batch` (a tensor, tuple/list or dict of tensors) along
dim 0 into micro-batches; loss_fn(model, micro_batch) returns (loss_sum, num_tokens). Each
micro-batch's summed loss is backpropagated unscaled (times the fp16 loss scale), so the
buffer holds the sum of per-token gradients; the step then divides by the total token count
once, on the device, inside grad_stats_ (which also measures the norm and counts non-finite
values). The result equals the full-batch mean-loss gradient whatever the token count of each
micro-batch. Optional: an activation budget (a recompute plan applied to the model's blocks
with me.segment at the first step), clipping, and for fp16 dynamic loss scaling (a step with a
non-finite gradient is skipped and the scale halved; it doubles after `growth_interval` good
steps).

The loop itself never synchronises with the device; after it, step() reads the non-finite
count once (to decide whether to step) and returns device tensors in its stats dict.
"""

import numbers

import torch

from memengine.engine.batches import split_batch
from memengine.grad import MasterOptimizer
from memengine.nn import patch
from memengine.segments import parse_bytes, repeated_blocks, segment


class Engine:
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
    ):
        """optimizer: a callable taking an iterable of parameters and returning a torch.optim
        optimizer (a class, or functools.partial(torch.optim.AdamW, lr=...)). loss_scale: "auto"
        (dynamic scaling when the model has fp16 parameters, none otherwise), a float (static), or None.
        budget: activation bytes (an int, or a string such as "6GiB") one micro-batch's forward and
        backward of the model's blocks may take; the first step profiles `blocks` (default: the
        model's largest nn.ModuleList of same-type modules, e.g. a Hugging Face model's layers) on
        its first micro-batch and applies the optimal recompute plan with me.segment
        (engine.segment_handle holds it). param_groups: optional per-group options, as torch.optim
        takes them, over the model's parameters (see MasterOptimizer). engine.optimizer is a
        torch.optim.Optimizer: learning-rate schedulers and step hooks attach to it."""
        if micro_batch_size < 1:
            raise ValueError(f"Engine: micro_batch_size must be at least 1, got {micro_batch_size}")
        self.budget = parse_bytes(budget) if isinstance(budget, str) else budget
        self.blocks = blocks
        self.segment_handle = None
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.max_norm = max_norm
        self.buffer = patch(model)
        self.buffer.check_coverage()  # a model patched earlier may have gained trainable parameters since
        self.optimizer = MasterOptimizer(optimizer, self.buffer, param_groups=param_groups)
        has_fp16 = any(p.dtype == torch.float16 for p in self.buffer.params)
        self.dynamic_loss_scale = loss_scale == "auto" and has_fp16
        if loss_scale == "auto":
            loss_scale = initial_loss_scale if has_fp16 else None
        self.loss_scale = float(loss_scale) if loss_scale is not None else 1.0
        self.growth_interval = growth_interval
        self._good_steps = 0

    def step(self, batch, loss_fn):
        device = self.buffer.data.device
        self.optimizer.zero_grad()
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        tokens_total = torch.zeros((), dtype=torch.float64, device=device)
        micro_batches = split_batch(batch, self.micro_batch_size)
        if self.budget is not None and self.segment_handle is None:
            blocks = self.blocks if self.blocks is not None else repeated_blocks(self.model)
            self.segment_handle = segment(
                blocks, budget=self.budget, sample=lambda: loss_fn(self.model, micro_batches[0])
            )
        # Counts given as Python numbers are summed on the host and added once: making a device
        # tensor of each would be a blocking host-to-device copy per micro-batch.
        host_tokens = 0
        for micro_batch in micro_batches:
            loss_sum, num_tokens = loss_fn(self.model, micro_batch)
            (loss_sum * self.loss_scale if self.loss_scale != 1.0 else loss_sum).backward()
            loss_total += loss_sum.detach().to(torch.float64)
            if isinstance(num_tokens, torch.Tensor):
                if num_tokens.numel() != 1:
                    raise ValueError(
                        f"Engine.step: loss_fn returned num_tokens of shape {tuple(num_tokens.shape)}; "
                        "return one count per micro-batch (a number or a one-element tensor)"
                    )
                tokens_total += num_tokens.detach().reshape(()).to(device=device, dtype=torch.float64)
            elif isinstance(num_tokens, numbers.Real):
                host_tokens += num_tokens  # Python ints stay exact
            else:
                raise TypeError(
                    f"Engine.step: loss_fn must return (loss_sum, num_tokens) with num_tokens a number or a "
                    f"tensor, got num_tokens of type {type(num_tokens).__name__}"
                )
        tokens_total += float(host_tokens)  # a scalar kernel argument, not a copy
        self.buffer.finish_window()
        scale = (1.0 / (tokens_total * self.loss_scale)).to(torch.float32)
        stats = self.buffer.stats(scale)  # buffer /= tokens * loss scale; [norm, non-finite]
        if self.max_norm is not None:
            self.buffer.clip_(stats, self.max_norm)
        skipped = bool(stats[1] > 0)  # the one host synchronisation of the step
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
        the fp32 masters) and the loss-scaling state. Loading it into an Engine built the same way
        continues bit-identically."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss_scale": self.loss_scale,
            "good_steps": self._good_steps,
        }

    def load_state_dict(self, state_dict):
        self.model.load_state_dict(state_dict["model"])
        # After the model: the masters then overwrite the low-precision parameters they round to.
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.loss_scale = state_dict["loss_scale"]
        self._good_steps = state_dict["good_steps"]
