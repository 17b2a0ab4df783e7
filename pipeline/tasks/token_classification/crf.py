"""A linear-chain CRF over a tagger's emissions: its negative log-likelihood for training and
Viterbi for training-time metrics and parity checks.

Written here because pytorch-crf is not in the pinned stack and its ~300 lines would be the one
dependency of one option; the runtime decodes with bertrt.decoding (numpy) instead.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bertrt.decoding import Transitions, iob2_allowed
from pipeline.tasks.token_classification.metrics import IGNORE


class LinearChainCrf(nn.Module):
    """Scores of tag j after tag i (`transitions[i, j]`), of opening with j (`start`) and of
    closing with i (`end`), over sequences of emissions whose mask is a prefix of each row."""

    def __init__(self, labels: list[str]) -> None:
        super().__init__()
        k = len(labels)
        self.labels = list(labels)
        self.transitions = nn.Parameter(torch.zeros(k, k))
        self.start = nn.Parameter(torch.zeros(k))
        self.end = nn.Parameter(torch.zeros(k))

    def reset_parameters(self) -> None:
        """Zeros: the untrained CRF scores every sequence by its emissions alone."""
        for weight in (self.transitions, self.start, self.end):
            nn.init.zeros_(weight)

    def log_partition(self, emissions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log of the summed exp-scores of every tag sequence, per row (b,), by the forward
        algorithm. emissions (b, n, k); mask (b, n) true on a prefix of each row."""
        alpha = self.start + emissions[:, 0]
        for t in range(1, emissions.shape[1]):
            step = alpha.unsqueeze(2) + self.transitions + emissions[:, t].unsqueeze(1)
            alpha = torch.where(mask[:, t : t + 1], torch.logsumexp(step, dim=1), alpha)
        return torch.logsumexp(alpha + self.end, dim=1)

    def score(
        self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The score of the given tag sequence, per row (b,)."""
        first = tags[:, 0]
        total = self.start[first] + emissions[:, 0].gather(1, first[:, None]).squeeze(1)
        for t in range(1, emissions.shape[1]):
            step = self.transitions[tags[:, t - 1], tags[:, t]]
            step = step + emissions[:, t].gather(1, tags[:, t : t + 1]).squeeze(1)
            total = total + step * mask[:, t]
        last = tags.gather(1, (mask.sum(1) - 1).clamp(min=0)[:, None]).squeeze(1)
        return total + self.end[last]

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `tags` per row (b,); 0 for a row with no position."""
        loss = self.log_partition(emissions, mask) - self.score(emissions, tags, mask)
        return torch.where(mask[:, 0], loss, torch.zeros_like(loss))

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The best tag sequence IOB2 allows, per row, over its masked prefix (training sees
        every transition: a window may open inside an entity)."""
        allowed_start, allowed_step = (
            torch.from_numpy(a).to(emissions.device) for a in iob2_allowed(self.labels)
        )
        inf = torch.tensor(float("-inf"), dtype=emissions.dtype, device=emissions.device)
        transitions = torch.where(allowed_step, self.transitions, inf)
        score = torch.where(allowed_start, self.start, inf) + emissions[:, 0]
        history = []
        for t in range(1, emissions.shape[1]):
            best, back = (score.unsqueeze(2) + transitions).max(dim=1)
            history.append(back)
            score = torch.where(mask[:, t : t + 1], best + emissions[:, t], score)
        score = score + self.end
        paths = []
        for row, length in enumerate(mask.sum(1).tolist()):
            if not length:
                paths.append([])
                continue
            path = [int(score[row].argmax())]
            for back in reversed(history[: length - 1]):
                path.append(int(back[row, path[-1]]))
            paths.append(path[::-1])
        return paths

    def transitions_table(self) -> Transitions:
        """The learned scores as the runtime reads them."""
        weights = (self.transitions, self.start, self.end)
        tables = [w.detach().float().cpu().numpy().astype(np.float64) for w in weights]
        return Transitions(tuple(self.labels), *tables)

    def load_table(self, table: Transitions) -> None:
        if list(table.labels) != self.labels:
            raise ValueError(
                f"transitions over labels {list(table.labels)!r:.120}, the model has "
                f"{self.labels!r:.120}"
            )
        with torch.no_grad():
            for weight, values in zip(
                (self.transitions, self.start, self.end),
                (table.transitions, table.start, table.end),
                strict=True,
            ):
                weight.copy_(torch.from_numpy(values))


def labelled(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (b, m), mask (b, m)): each row's labelled positions moved to its front, in order,
    so that a CRF runs over the words' first subwords and nothing else."""
    keep = labels != IGNORE
    counts = keep.sum(1)
    width = max(int(counts.max()) if len(counts) else 0, 1)
    index = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    mask = torch.arange(width, device=labels.device)[None, :] < counts[:, None]
    return index, mask
