"""Layer-wise learning-rate decay: the encoder's lower layers learn slower than the head."""

from __future__ import annotations

import re
from typing import Any

# `encoder.layer.3.` (BERT, RoBERTa, MiniLM, ELECTRA), `transformer.layer.3.` (DistilBERT).
LAYER = re.compile(r"\.layer\.(\d+)\.")
NO_DECAY = ("bias", "layernorm", "layer_norm", "norm.weight")


def depth_of(name: str, layers: int) -> int:
    """How many steps below the head a parameter sits: layer i of L is L - i, embeddings L + 1,
    the head (classifier, pooler, LM head) 0."""
    found = LAYER.search(name)
    if found:
        return layers - int(found.group(1))
    if "embeddings" in name:
        return layers + 1
    return 0


def parameter_groups(
    model: Any, learning_rate: float, decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups with lr * decay ** depth, no weight decay for biases and norms."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layers = 1 + max((int(m.group(1)) for n, _ in named if (m := LAYER.search(n))), default=-1)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        depth = depth_of(name, layers)
        decays = not any(key in name.lower() for key in NO_DECAY)
        group = groups.setdefault(
            (depth, decays),
            {
                "params": [],
                "lr": learning_rate * decay**depth,
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def optimizer(model: Any, learning_rate: float, decay: float, weight_decay: float) -> Any:
    """torch AdamW over `parameter_groups`; the Trainer adds its schedule, which scales every
    group's lr by the same factor, so the ratios hold throughout training."""
    import torch

    return torch.optim.AdamW(
        parameter_groups(model, learning_rate, decay, weight_decay), lr=learning_rate
    )
