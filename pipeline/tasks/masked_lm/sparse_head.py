"""Masked-LM training that runs the vocabulary-wide output layer only where there is a label.

A `*ForMaskedLM` model applies its head (transform and a decoder as wide as the vocabulary) to
every position, then the loss ignores all but the 15-25 % that were masked. On a small encoder
that head is most of the step. `install` hooks a model so that, whenever it is called with
`labels`, the encoder's output is cut to the labelled positions before the head and the loss is
the same cross-entropy over those positions: the same loss and gradients, less work. The logits
it returns then have one row per labelled position, `(1, n, vocab)`, in row-major order of
`labels != -100`; `scatter` puts their argmax back in the shape of `labels`. Without `labels`
(inference, export) the model runs unchanged; the hooks are not saved with it.
"""

from __future__ import annotations

from typing import Any

IGNORE = -100


def install(model: Any) -> list[Any]:
    """Hook `model` (any HF masked LM whose head reads `base_model`'s first output); returns
    the hook handles (`.remove()` undoes it)."""
    import torch
    from transformers.modeling_outputs import MaskedLMOutput

    state: dict[str, Any] = {}

    def take_labels(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        labels = kwargs.pop("labels", None)
        state["labels"] = labels
        state["items"] = kwargs.pop("num_items_in_batch", None) if labels is not None else None
        return args, kwargs

    def cut_hidden(module: Any, args: tuple, output: Any) -> Any:
        labels = state.get("labels")
        if labels is None:
            return output
        hidden = output[0][labels != IGNORE].unsqueeze(0)
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        output.last_hidden_state = hidden
        return output

    def add_loss(module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        labels = state.pop("labels", None)
        items = state.pop("items", None)
        if labels is None:
            return output
        logits = output.logits
        target = labels[labels != IGNORE]
        loss = torch.nn.functional.cross_entropy(
            logits.view(-1, logits.shape[-1]).float(), target, reduction="sum"
        )
        loss = loss / (items if items is not None else max(target.numel(), 1))
        return MaskedLMOutput(loss=loss, logits=logits)

    return [
        model.register_forward_pre_hook(take_labels, with_kwargs=True),
        model.base_model.register_forward_hook(cut_hidden),
        model.register_forward_hook(add_loss, with_kwargs=True),
    ]


def scatter(logits: Any, labels: Any) -> Any:
    """Predicted ids in the shape of `labels` (-100 where there is no label), from dense
    `(batch, length, vocab)` logits or the hooked model's `(1, labelled, vocab)`."""
    import torch

    if isinstance(logits, tuple):
        logits = logits[0]
    if logits.shape[:2] == labels.shape:
        return logits.argmax(-1)
    out = torch.full_like(labels, IGNORE)
    out[labels != IGNORE] = logits.argmax(-1).reshape(-1).to(out.dtype)
    return out
