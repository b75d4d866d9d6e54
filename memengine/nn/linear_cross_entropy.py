"""memengine.linear_cross_entropy: a language model's head (a Linear over the vocabulary) and its cross-entropy
loss in one call, with logits one bounded tile at a time (memengine.ops.linear_cross_entropy) instead of a
[tokens, vocabulary] matrix, in fp32 throughout; a patched head's gradients go straight into its fp32 buffer."""

from memengine.autograd import LinearCrossEntropyFunction
from memengine.grad.hooks import buffer_of


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    bias=None,
    *,
    ignore_index=-100,
    label_smoothing=0.0,
    softcap=None,
    logit_scale=1.0,
    z_loss=0.0,
    chunk_bytes=None,
):
    """(loss summed over the tokens not labelled ignore_index, their number) of the logits
    transform(hidden @ weight.T + bias), without ever holding those logits whole.

    hidden [..., H] (any float dtype), weight [V, H] (the head's weight: lm_head.weight, or a tied input
    embedding's), labels [...] (token ids; ignore_index: no loss), bias [V] or None. The logits are computed
    in fp32 from the bf16/fp16/fp32 operands, multiplied by logit_scale (Cohere's logit_scale), then with
    softcap = c squashed to c * tanh(z / c) (Gemma 2's final_logit_softcapping); the loss per token is
    torch.nn.functional.cross_entropy's with label_smoothing, plus z_loss * logsumexp^2 when z_loss > 0.
    Divide the sum by the count for the mean (Hugging Face's loss; with Trainer's num_items_in_batch, by that).

    Memory: one tile of fp32 logits (and, in backward, their gradient) plus an fp32 copy of one tile of the
    weight, about chunk_bytes (default 16 MiB) in all, instead of tokens x vocabulary logits (and their fp32
    copies, log-softmax and gradients). The backward recomputes the tiles; when the head belongs to a
    GradBuffer (memengine.patch), its weight and bias gradients are added into main_grad in fp32 tile by tile.
    Returns (fp32 0-dim loss sum, int64 0-dim count): the (loss_sum, num_tokens) memengine.Engine's loss_fn
    returns."""
    options = {
        "ignore_index": ignore_index,
        "label_smoothing": float(label_smoothing),
        "softcap": None if softcap is None else float(softcap),
        "logit_scale": float(logit_scale),
        "z_loss": float(z_loss),
        "chunk_bytes": chunk_bytes,
    }
    sink = buffer_of(weight)
    if bias is not None and buffer_of(bias) is not sink:
        raise ValueError(
            "linear_cross_entropy: weight and bias belong to different GradBuffers (or only one to a buffer); "
            "patch the model that holds both"
        )
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, options, sink)
