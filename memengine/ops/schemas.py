"""Op schemas (namespace "memengine"), with their reference and fake kernels registered.

Each op is defined here once. The reference kernel is registered for every device
(CompositeExplicitAutograd), so the op exists even without the compiled extension; the
C++/CUDA kernels in csrc/ register for the CPU and CUDA dispatch keys and take precedence.
The reference kernels are also the test oracle and the benchmark baseline.

alpha is split in two arguments because a schema cannot take "float or Tensor":
`alpha` (a float) is used unless `alpha_tensor` (a 0-dim float32 tensor) is given.
"""

import torch

from memengine.ops import fake, reference

_lib = torch.library.Library("memengine", "DEF")  # noqa: TOR901 - the namespace is ours

_lib.define(
    "accumulate_(Tensor(a!) dst, Tensor src, float alpha=1.0, Tensor? alpha_tensor=None, bool overwrite=False) -> ()"
)
_lib.define(
    "bias_grad_accumulate_(Tensor(a!) main_grad, Tensor grad_output, float alpha=1.0, Tensor? alpha_tensor=None, "
    "bool overwrite=False) -> ()"
)
_lib.define(
    "wgrad_accumulate_(Tensor(a!) main_grad, Tensor grad_output, Tensor input, float alpha=1.0, "
    "Tensor? alpha_tensor=None, bool overwrite=False) -> ()"
)
_lib.define("grad_stats_(Tensor(a!) flat, float scale=1.0, Tensor? scale_tensor=None) -> Tensor")
_lib.define("clip_(Tensor(a!) flat, Tensor stats, float max_norm) -> ()")
_lib.define(
    "multi_accumulate_(Tensor(a!)[] dsts, Tensor[] srcs, float alpha=1.0, Tensor? alpha_tensor=None, "
    "bool overwrite=False) -> ()"
)
_lib.define(
    "cross_entropy_tile_forward_(Tensor(a!) logits, Tensor? bias, Tensor labels, int start, float logit_scale, "
    "float softcap, Tensor(b!) running_max, Tensor(c!) running_sum, Tensor(d!) target, Tensor(e!)? logit_sum) -> ()"
)
_lib.define(
    "cross_entropy_tile_backward_(Tensor(a!) logits, Tensor? bias, Tensor labels, int start, float logit_scale, "
    "float softcap, Tensor lse, Tensor probability_scale, Tensor row_scale, float uniform, float target_weight) -> ()"
)

_lib.impl("accumulate_", reference.accumulate_reference_, "CompositeExplicitAutograd")
_lib.impl("bias_grad_accumulate_", reference.bias_grad_accumulate_reference_, "CompositeExplicitAutograd")
_lib.impl("wgrad_accumulate_", reference.wgrad_accumulate_reference_, "CompositeExplicitAutograd")
_lib.impl("grad_stats_", reference.grad_stats_reference_, "CompositeExplicitAutograd")
_lib.impl("clip_", reference.clip_reference_, "CompositeExplicitAutograd")
_lib.impl("multi_accumulate_", reference.multi_accumulate_reference_, "CompositeExplicitAutograd")
_lib.impl("cross_entropy_tile_forward_", reference.cross_entropy_tile_forward_reference_, "CompositeExplicitAutograd")
_lib.impl("cross_entropy_tile_backward_", reference.cross_entropy_tile_backward_reference_, "CompositeExplicitAutograd")

torch.library.register_fake("memengine::accumulate_", fake.accumulate_fake)
torch.library.register_fake("memengine::bias_grad_accumulate_", fake.bias_grad_accumulate_fake)
torch.library.register_fake("memengine::wgrad_accumulate_", fake.wgrad_accumulate_fake)
torch.library.register_fake("memengine::grad_stats_", fake.grad_stats_fake)
torch.library.register_fake("memengine::clip_", fake.clip_fake)
torch.library.register_fake("memengine::multi_accumulate_", fake.multi_accumulate_fake)
torch.library.register_fake("memengine::cross_entropy_tile_forward_", fake.cross_entropy_tile_forward_fake)
torch.library.register_fake("memengine::cross_entropy_tile_backward_", fake.cross_entropy_tile_backward_fake)
