"""Masked-LM scores: held-out loss and perplexity, and the probes' fills (greedy or joint)."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from pipeline.tasks.masked_lm.masks import IGNORE


def heldout_scores(model: Any, dataset: Any, collator: Any, batch_size: int) -> dict[str, float]:
    """Summed negative log-likelihood and top-1/top-5 hits at the masked positions."""
    import torch

    model.eval()
    nll = top1 = top5 = count = 0.0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = collator(rows)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            where = labels != IGNORE
            picked, truth = torch.log_softmax(logits[where], dim=-1), labels[where]
            nll -= float(picked.gather(1, truth[:, None]).sum())
            best = picked.topk(min(5, picked.shape[-1]), dim=-1).indices
            top1 += float((best[:, 0] == truth).sum())
            top5 += float((best == truth[:, None]).any(dim=-1).sum())
            count += int(where.sum())
    return {"nll": nll, "top1": top1, "top5": top5, "count": count}


def perplexity(scores: dict[str, float]) -> float:
    return math.exp(scores["nll"] / scores["count"]) if scores["count"] else float("nan")


def probe_fills(model: Any, tokenizer: Any, probes: pd.DataFrame) -> list[dict[str, Any]]:
    """Per probe, its fills as the runtime makes them (`bertrt.predictors.fill_mask`), each right
    only when every mask is: `fill`, each mask's best token from one pass (the `independent`
    strategy); `greedy`, each run of consecutive masks filled left to right, each best token put in
    before the next mask is read; `beam`, the same search keeping the runtime's default `beam_size`
    best partial fills; and the top 5 tokens of each mask, right when each answer token is in its
    mask's top 5."""
    import torch

    from bertrt.predictors.fill_mask import BEAM_SIZE

    model.eval()
    out = []
    with torch.no_grad():
        for text, answer in zip(probes["text"], probes["answer"], strict=True):
            enc = tokenizer(text, return_tensors="pt", truncation=True)
            where = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
            first = torch.log_softmax(model(**enc).logits[0, where].float(), dim=-1)
            top = first.topk(min(5, first.shape[-1]), dim=-1).indices.tolist()
            best = [t[0] for t in top]
            greedy = joint_fill(model, enc, where, first, width=1)
            beam = joint_fill(model, enc, where, first, width=BEAM_SIZE)
            truth = tokenizer(answer, add_special_tokens=False)["input_ids"]
            out.append(
                {
                    "fill": fill_text(tokenizer, best),
                    "greedy": fill_text(tokenizer, greedy),
                    "greedy_ok": greedy == truth,
                    "beam": fill_text(tokenizer, beam),
                    "beam_ok": beam == truth,
                    "top5": [fill_text(tokenizer, t) for t in top],
                    "top1_ok": best == truth,
                    "top5_ok": len(top) == len(truth)
                    and all(a in t for a, t in zip(truth, top, strict=False)),
                    "masks": len(top),
                }
            )
    return out


def joint_fill(model: Any, enc: Any, where: list[int], first: Any, width: int) -> list[int]:
    """The best joint fill of every run of consecutive masks, by the runtime's own search
    (`bertrt.predictors.fill_mask.beam_search`, `width` best partial fills): the first mask of
    a run reads the one pass (`first`, log-probabilities per mask), the others a pass with the
    run's earlier tokens put in and the other runs still masked."""
    import torch

    from bertrt.predictors.fill_mask import beam_search, runs

    row_of = {p: r for r, p in enumerate(where)}
    filled: list[int] = []
    for group in runs(where):

        def rescore(step: int, prefixes: list[list[int]], group: list[int] = group) -> Any:
            ids = enc["input_ids"].repeat(len(prefixes), 1)
            ids[:, group[:step]] = torch.tensor(prefixes)
            batch = {k: v.expand(len(prefixes), -1) for k, v in enc.items()}
            logits = model(**{**batch, "input_ids": ids}).logits[:, group[step]].float()
            return torch.log_softmax(logits, dim=-1).numpy()

        rows = first[[row_of[p] for p in group]].numpy()
        filled += beam_search(rows, rescore, width)[0][0]
    return filled


def fill_text(tokenizer: Any, ids: list[int]) -> str:
    """Token ids as text, without the spaces a WordPiece decoder puts between CJK characters."""
    from bertrt.predictors.fill_mask import join_cjk

    return join_cjk(tokenizer.decode(ids))
