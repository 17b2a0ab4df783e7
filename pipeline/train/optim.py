"""AdamW parameter groups: layer-wise learning-rate decay (the encoder's lower layers learn slower
than the head) and parameters a task trains at a rate of their own (a CRF's transitions)."""

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
    model: Any,
    learning_rate: float,
    decay: float,
    weight_decay: float,
    own_rates: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups with lr * decay ** depth, no weight decay for biases and norms; a parameter
    whose name starts with a prefix of `own_rates` gets that rate instead (no depth decay)."""
    own_rates = own_rates or {}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    layers = 1 + max((int(m.group(1)) for n, _ in named if (m := LAYER.search(n))), default=-1)
    groups: dict[tuple[str, int, bool], dict[str, Any]] = {}
    for name, param in named:
        prefix = next((k for k in own_rates if name.startswith(k)), "")
        depth = 0 if prefix else depth_of(name, layers)
        decays = not any(key in name.lower() for key in NO_DECAY)
        group = groups.setdefault(
            (prefix, depth, decays),
            {
                "params": [],
                "lr": own_rates[prefix] if prefix else learning_rate * decay**depth,
                "weight_decay": weight_decay if decays else 0.0,
            },
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def optimizer(
    model: Any,
    learning_rate: float,
    decay: float,
    weight_decay: float,
    own_rates: dict[str, float] | None = None,
) -> Any:
    """torch AdamW over `parameter_groups`; the Trainer adds its schedule, which scales every
    group's lr by the same factor, so the ratios hold throughout training."""
    import torch

    groups = parameter_groups(model, learning_rate, decay, weight_decay, own_rates)
    return torch.optim.AdamW(groups, lr=learning_rate)
