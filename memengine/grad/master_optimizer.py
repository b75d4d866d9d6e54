"""MasterOptimizer: fp32 master weights for low-precision parameters, stepped by any torch optimizer.

The masters of all bf16/fp16 parameters live in one flat fp32 tensor laid out like the
GradBuffer, so each master's .grad is simply its main_grad view: the wrapped optimizer steps
fp32 values with fp32 gradients, then the model parameters are refreshed from the masters in
one multi-tensor copy (torch._foreach_copy_, which casts). fp32 parameters are stepped in place
(they are their own masters).
"""

import torch


class MasterOptimizer:
    def __init__(self, optimizer_cls, buffer, **kwargs):
        self.buffer = buffer
        self.master_data = None  # allocated only when some parameter is not fp32
        if any(p.dtype != torch.float32 for p in buffer.params):
            self.master_data = torch.empty(buffer.data.numel(), dtype=torch.float32, device=buffer.data.device)
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
        self.optimizer = optimizer_cls([m for _, m in self.masters], **kwargs)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none=True):
        """Opens a new accumulation window in the GradBuffer (no memory is touched)."""
        self.buffer.start_window()

    def step(self, closure=None):
        """Steps the masters with the gradients in the buffer (parameters that received none in
        this window are skipped, as torch.optim skips .grad None), then refreshes the model."""
        if closure is not None:
            raise ValueError("MasterOptimizer.step: closures are not supported; compute the loss before step()")
        for p, master in self.masters:
            master.grad = p.main_grad if self.buffer.received_gradient(p) else None
        self.optimizer.step()
        self.refresh_model()

    @torch.no_grad()
    def refresh_model(self):
        """Model parameters <- masters (cast to their dtype)."""
        if self._low_precision:
            torch._foreach_copy_([p for p, _ in self._low_precision], [m for _, m in self._low_precision])

    def state_dict(self):
        return {
            "optimizer": self.optimizer.state_dict(),
            "masters": None if self.master_data is None else self.master_data.clone(),
        }

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        if state["masters"] is not None:
            self.master_data.copy_(state["masters"])
            self.refresh_model()
