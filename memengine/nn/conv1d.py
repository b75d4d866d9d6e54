"""Conv1DFusedMixin: the fused backward of memengine.nn.Linear for Hugging Face transformers'
Conv1D (GPT-2), whose weight is stored as [in, out]: its gradient input^T @ grad_output is
wgrad_accumulate_ with the two operands swapped, so no transpose is needed."""

from memengine.nn.linear import fused_linear


class Conv1DFusedMixin:
    """Mixed into a Hugging Face Conv1D subclass by memengine.patch (weight [in, out], bias [out])."""

    def forward(self, x):
        output = fused_linear(x, self.weight, self.bias, transposed=True)
        return super().forward(x) if output is None else output
