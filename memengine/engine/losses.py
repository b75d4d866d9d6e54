"""Ready-made loss functions for Engine.step: each returns (summed loss, token count), the contract
that lets the Engine normalise by the whole batch's token count whatever each micro-batch holds."""

import collections.abc

import torch
import torch.nn.functional as F

from memengine.models.gpt import GPT
from memengine.nn import linear_cross_entropy

IGNORE_INDEX = -100  # the label of positions that carry no loss (padding, prompts), as torch and Hugging Face use


def causal_lm_loss(model, micro_batch, fused=True):
    """(summed next-token cross-entropy, number of predicted tokens) of a causal language model.

    micro_batch: a tensor of token ids (every next token counts), or a Mapping such as a
    transformers.BatchEncoding with "input_ids" and optionally "labels" (positions labelled -100
    carry no loss; without "labels" the labels are the input ids, with the positions where
    "attention_mask" is 0 ignored). The model is called as model(**inputs without "labels") (a
    tensor batch: model(tokens)) and must return logits [batch, sequence, vocabulary], either as a
    tensor or as an output object's .logits (Hugging Face models).

    As Hugging Face's causal LM loss: position t predicts label t+1 (the last logit and the first
    label are dropped), cross-entropy in fp32, labels -100 ignored; but summed, not averaged.
    The count (labels != -100 after the shift) is a tensor on the model's device: reading it
    would synchronise with the device. loss_sum / count is Hugging Face's output.loss.

    For the models it recognises (language_model_parts: memengine's GPT and the Hugging Face causal
    LMs of FUSED_LOSS_MODEL_TYPES) the logits are never made: the loss is taken from the final
    hidden states and the head's weight by memengine.linear_cross_entropy (fp32 logits one bounded
    tile at a time; a patched head's gradient goes into its fp32 buffer), with the model's logit
    scale and soft cap. Other models are called for their logits as above, and so is every model with
    fused=False (plain PyTorch's loss: what a comparison with the usual recipe must use).
    """
    if isinstance(micro_batch, torch.Tensor):
        labels, args, inputs = micro_batch, (micro_batch,), {}
    elif isinstance(micro_batch, collections.abc.Mapping):
        args, inputs = (), {key: value for key, value in micro_batch.items() if key != "labels"}
        labels = micro_batch.get("labels")
        if labels is None:
            labels = _labels_from_inputs(inputs)
    else:
        raise TypeError(
            "causal_lm_loss: a micro-batch must be a tensor of token ids or a Mapping with 'input_ids' "
            f"(and optionally 'labels'), got {type(micro_batch).__name__}"
        )
    parts = language_model_parts(model) if fused else None
    if parts is not None:
        hidden = parts.hidden_states(*args, **inputs)
        if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
            raise ValueError(
                f"causal_lm_loss: hidden states of shape {tuple(hidden.shape)} do not match labels of shape "
                f"{tuple(labels.shape)}"
            )
        head = parts.head
        return linear_cross_entropy(
            hidden[:, :-1],
            head.weight,
            labels[:, 1:].to(hidden.device),
            head.bias,
            ignore_index=IGNORE_INDEX,
            softcap=parts.softcap,
            logit_scale=parts.logit_scale,
        )
    output = model(*args, **inputs)
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"causal_lm_loss: the model returned a {type(output).__name__} without logits; it must return a "
            "logits tensor or an output with .logits (Hugging Face models do unless return_dict=False)"
        )
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"causal_lm_loss: logits of shape {tuple(logits.shape)} do not match labels of shape "
            f"{tuple(labels.shape)}; expected logits [batch, sequence, vocabulary] for labels [batch, sequence]"
        )
    predicting = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(logits.device)
    loss_sum = F.cross_entropy(predicting.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


class LanguageModelParts:
    """How causal_lm_loss reaches a model's final hidden states and its head without computing the logits:
    hidden_states(*args, **inputs) -> [batch, sequence, hidden]; head: the nn.Linear over the vocabulary;
    the logits are transform(head(hidden)) with logit_scale, then softcap (None: none)."""

    def __init__(self, hidden_states, head, logit_scale=1.0, softcap=None):
        self.hidden_states, self.head, self.logit_scale, self.softcap = hidden_states, head, logit_scale, softcap


# Hugging Face causal LMs whose forward computes logits = lm_head(base_model(...)[0]), then at most a scale
# (Cohere's logit_scale, Granite's 1 / logits_scaling) and a soft cap (Gemma 2's final_logit_softcapping),
# and adds no other term to the loss (mixture-of-experts models add a router loss: not listed).
FUSED_LOSS_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "cohere", "granite")


FUSED_LOSS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what linear_cross_entropy's products take


def language_model_parts(model):
    """The LanguageModelParts of `model` when causal_lm_loss knows how its logits are made (memengine's GPT, the
    Hugging Face causal LMs of FUSED_LOSS_MODEL_TYPES), else None (the loss is then taken from the logits)."""
    if isinstance(model, GPT) and isinstance(model.head, torch.nn.Linear):
        if model.head.weight.dtype not in FUSED_LOSS_DTYPES:
            return None
        return LanguageModelParts(model.hidden_states, model.head)
    if hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None)):
        # A peft PeftModel (the model it wraps has peft_config too): its own forward may change the inputs.
        adapted = _adapted_model(model)
        return None if adapted is None else language_model_parts(adapted)
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_LOSS_MODEL_TYPES:
        return None
    get_head, base = getattr(model, "get_output_embeddings", None), getattr(model, "base_model", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear) or not isinstance(base, torch.nn.Module) or base is model:
        return None
    if head.weight.dtype not in FUSED_LOSS_DTYPES:
        return None
    if not type(model).__name__.endswith("ForCausalLM") and type(model).__name__ != "GPT2LMHeadModel":
        return None

    def hidden_states(*args, **inputs):
        return base(*args, **inputs)[0]

    scale = getattr(config, "logit_scale", None) or 1.0
    if getattr(config, "logits_scaling", None):
        scale = 1.0 / config.logits_scaling
    return LanguageModelParts(hidden_states, head, scale, getattr(config, "final_logit_softcapping", None))


def _adapted_model(model):
    """The model a peft PeftModel wraps, when its adapters live inside that model's layers (LoRA, IA3 and the like:
    calling the wrapped model runs them), else None. Prompt-learning methods (prompt, prefix and p-tuning) change
    the inputs in PeftModel.forward itself: their loss stays on the logits."""
    try:
        config = model.active_peft_config
    except (AttributeError, ValueError):  # several active adapters, or none
        return None
    if getattr(config, "is_prompt_learning", True):
        return None
    base = model.get_base_model()
    return base if isinstance(base, torch.nn.Module) and base is not model else None


def loss_path(loss_fn, model):
    """What a step's loss computes through, for engine.memory_report(): the fused linear + cross-entropy or the
    logits (causal_lm_loss), or the user's loss_fn."""
    if loss_fn is causal_lm_loss:
        if language_model_parts(model) is not None:
            return "causal_lm_loss: fused linear cross-entropy (no logits tensor)"
        return "causal_lm_loss: through the logits (model not recognised for the fused loss)"
    return f"loss_fn {getattr(loss_fn, '__qualname__', type(loss_fn).__name__)}"


def _labels_from_inputs(inputs):
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"causal_lm_loss: the micro-batch has neither 'labels' nor 'input_ids' (keys: {list(inputs)}); "
            "give the token ids as 'input_ids' and, where some positions carry no loss, 'labels' with -100 there"
        )
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
