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
    ):
        """optimizer: a callable taking an iterable of parameters and returning a torch.optim
        optimizer (a class, or functools.partial(torch.optim.AdamW, lr=...)). loss_scale: "auto"
        (dynamic scaling when the model has fp16 parameters, none otherwise), a float (static), or None.
        budget: activation bytes (an int, or a string such as "6GiB") one micro-batch's forward and
        backward of the model's blocks may take; the first step profiles `blocks` (default: the
        model's largest nn.ModuleList of same-type modules, e.g. a Hugging Face model's layers) on
        its first micro-batch and applies the optimal recompute plan with me.segment
        (engine.segment_handle holds it)."""
        if micro_batch_size < 1:
            raise ValueError(f"Engine: micro_batch_size must be at least 1, got {micro_batch_size}")
        self.budget = parse_bytes(budget) if isinstance(budget, str) else budget
        self.blocks = blocks
        self.segment_handle = None
        self.model = model
        self.micro_batch_size = micro_batch_size
        self.max_norm = max_norm
        self.buffer = patch(model)
        self.optimizer = MasterOptimizer(optimizer, self.buffer)
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
        for micro_batch in micro_batches:
            loss_sum, num_tokens = loss_fn(self.model, micro_batch)
            (loss_sum * self.loss_scale if self.loss_scale != 1.0 else loss_sum).backward()
            loss_total += loss_sum.detach().to(torch.float64)
            tokens_total += torch.as_tensor(num_tokens, dtype=torch.float64, device=device)
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
