"""Ready-made loss functions for Engine.step: each returns (summed loss, token count), the contract
that lets the Engine normalise by the whole batch's token count whatever each micro-batch holds."""

import collections.abc

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of positions that carry no loss (padding, prompts), as torch and Hugging Face use


def causal_lm_loss(model, micro_batch):
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
    """
    if isinstance(micro_batch, torch.Tensor):
        labels = micro_batch
        output = model(micro_batch)
    elif isinstance(micro_batch, collections.abc.Mapping):
        inputs = {key: value for key, value in micro_batch.items() if key != "labels"}
        labels = micro_batch.get("labels")
        if labels is None:
            labels = _labels_from_inputs(inputs)
        output = model(**inputs)
    else:
        raise TypeError(
            "causal_lm_loss: a micro-batch must be a tensor of token ids or a Mapping with 'input_ids' "
            f"(and optionally 'labels'), got {type(micro_batch).__name__}"
        )
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
