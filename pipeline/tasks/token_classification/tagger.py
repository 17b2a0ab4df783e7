"""The token-classification model: transformers' own head, or the same head with a CRF over its
logits; and how the fine-tuned folder says it is decoded (config.json, transitions.json)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bertrt.contract import TRANSITIONS_FILE
from bertrt.decoding import ARGMAX, CRF, Decoder, Transitions

log = logging.getLogger(__name__)

# config.json keys of a fine-tuned tagger: its decoding (argmax or viterbi) and its CRF head.
DECODING_KEY = "decoding"
CRF_KEY = "crf"


class TokenTagger:
    """`AutoModelForTokenClassification`, with a CRF head where the config says `crf: true`."""

    @classmethod
    def from_pretrained(
        cls,
        location: str | Path,
        *args: Any,
        decoding: str | None = None,
        crf: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """The model at `location`; `decoding` and `crf` (fine-tuning's params) are recorded in
        its config, which saves them into config.json beside the weights."""
        from transformers import (
            MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING,
            AutoConfig,
            AutoModelForTokenClassification,
        )

        if "config" in kwargs:
            raise TypeError("TokenTagger.from_pretrained reads the config at `location`")
        head = {k: kwargs.pop(k) for k in ("num_labels", "id2label", "label2id") if k in kwargs}
        if "id2label" in head:  # the label count follows from them
            head.pop("num_labels", None)
        trust = kwargs.get("trust_remote_code", False)
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust, **head)
        for key, value in ((DECODING_KEY, decoding), (CRF_KEY, crf)):
            if value is not None:
                setattr(config, key, value)
        model_class = AutoModelForTokenClassification
        if getattr(config, CRF_KEY, False):
            model_class = with_crf(MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING[type(config)])
        return model_class.from_pretrained(location, *args, config=config, **kwargs)


@cache
def with_crf(base: type) -> type:
    """`base` (a transformers token classifier) with a CRF over its logits: trained with the
    CRF's likelihood over each row's labelled positions, its transitions saved beside the
    weights (TRANSITIONS_FILE) as the export ships them."""
    import torch
    from transformers import initialization as init

    from pipeline.tasks.token_classification.crf import LinearChainCrf, labelled
    from pipeline.tasks.token_classification.metrics import IGNORE

    CrfOutput = crf_output()

    class WithCrf(base):
        # The loss is a mean over the batch's labelled positions already.
        accepts_loss_kwargs = False

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(config, *args, **kwargs)
            labels = [config.id2label[i] for i in range(config.num_labels)]
            self.crf = LinearChainCrf(labels)

        def _init_weights(self, module: Any) -> None:
            if isinstance(module, LinearChainCrf):
                for weight in (module.transitions, module.start, module.end):
                    init.zeros_(weight)
                return
            super()._init_weights(module)

        def forward(
            self,
            input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            token_type_ids: torch.Tensor | None = None,
            labels: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> Any:
            given = {"input_ids": input_ids, "attention_mask": attention_mask}
            given["token_type_ids"] = token_type_ids  # absent from some models' inputs
            inputs = {k: v for k, v in given.items() if v is not None}
            out = super().forward(**inputs, **kwargs)
            if labels is None:
                return CrfOutput(
                    logits=out.logits, hidden_states=out.hidden_states, attentions=out.attentions
                )
            index, mask = labelled(labels)
            k = out.logits.shape[-1]
            with torch.autocast(out.logits.device.type, enabled=False):
                emissions = out.logits.float().gather(1, index[..., None].expand(-1, -1, k))
                tags = labels.gather(1, index).masked_fill(~mask, 0)
                loss = self.crf.nll(emissions, tags, mask).sum() / mask.sum().clamp(min=1)
            decoded = None
            if not self.training:  # the selection metric reads the CRF's own decoding
                decoded = torch.full_like(labels, IGNORE)
                for row, path in enumerate(self.crf.decode(emissions, mask)):
                    decoded[row, index[row, : len(path)]] = torch.tensor(path, dtype=labels.dtype)
            return CrfOutput(loss=loss, logits=out.logits, tags=decoded)

        def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
            super().save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                self.crf.transitions_table().write(Path(save_directory) / TRANSITIONS_FILE)

    WithCrf.__name__ = WithCrf.__qualname__ = f"{base.__name__}WithCrf"
    return WithCrf


@cache
def crf_output() -> type:
    """The CRF model's output: transformers' TokenClassifierOutput plus `tags` (defined once:
    transformers registers every output class with torch)."""
    import torch
    from transformers.modeling_outputs import TokenClassifierOutput

    @dataclass
    class CrfOutput(TokenClassifierOutput):
        """The head's logits (the CRF's emissions); in evaluation with labels, `tags`: the
        decoded tag of each labelled position (IGNORE elsewhere)."""

        tags: torch.Tensor | None = None

    return CrfOutput


@dataclass(frozen=True)
class Recorded:
    """What a fine-tuned tagger's config.json says about its decoding."""

    decoding: str
    crf: bool


# A model fine-tuned before the decoding was recorded decodes as it always did.
UNRECORDED = Recorded(ARGMAX, False)


def recorded(model_dir: Path) -> Recorded | None:
    """The decoding and CRF head the fine-tuned model's config.json records, if it does."""
    config = _config(model_dir)
    if DECODING_KEY not in config:
        return None
    return Recorded(str(config[DECODING_KEY]), bool(config.get(CRF_KEY, False)))


def check_params(model_dir: Path, section: Any) -> None:
    """Refuse a model fine-tuned with another decoding or head than the params now say (re-run
    finetune); let one that records none decode by argmax, with a warning."""
    wanted = Recorded(section.decoding, section.crf)
    found = recorded(model_dir)
    if found is None and wanted.crf:
        raise ValueError(
            f"{model_dir}: the fine-tuned model has no CRF head, but token-classification.crf "
            "is true; re-run the finetune stage"
        )
    if found is None and wanted != UNRECORDED:
        log.warning(
            "%s records no decoding (fine-tuned before token-classification.decoding was "
            "recorded): it decodes by argmax; re-run finetune to decode by %s",
            model_dir,
            wanted.decoding,
        )
    elif found is not None and found != wanted:
        raise ValueError(
            f"{model_dir}: fine-tuned with decoding {found.decoding!r} and crf {found.crf}, but "
            f"token-classification now says decoding {wanted.decoding!r} and crf "
            f"{wanted.crf}; re-run the finetune stage"
        )


def model_decoder(model_dir: Path) -> Decoder:
    """How the fine-tuned model at `model_dir` is decoded: its recorded decoding over its
    labels, with the CRF's transitions where it has a CRF head."""
    config = _config(model_dir)
    labels = tuple(config["id2label"][str(i)] for i in range(len(config["id2label"])))
    found = recorded(model_dir) or UNRECORDED
    if not found.crf:
        return Decoder(labels, found.decoding)
    path = Path(model_dir) / TRANSITIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: missing; the model's config.json says it has a CRF head, whose "
            "transitions are saved there: re-run the finetune stage"
        )
    return Decoder(labels, CRF, Transitions.read(path))


def settings(section: Any) -> dict[str, Any]:
    """from_pretrained arguments that record the params' decoding and head in the model."""
    return {DECODING_KEY: section.decoding, CRF_KEY: section.crf}


def _config(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
