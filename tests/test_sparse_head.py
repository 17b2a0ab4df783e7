"""The masked-position head gives the dense model's loss and gradients, and its predictions
land where the labels are."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pipeline.tasks.masked_lm import sparse_head  # noqa: E402


def tiny_mlm(kind: str) -> object:
    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": 50, "max_position_embeddings": 32}
    if kind == "bert":
        config = transformers.BertConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            **common,
        )
        return transformers.BertForMaskedLM(config)
    if kind == "distilbert":
        config = transformers.DistilBertConfig(
            dim=16, n_layers=1, n_heads=2, hidden_dim=32, **common
        )
        return transformers.DistilBertForMaskedLM(config)
    config = transformers.RobertaConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        pad_token_id=1,
        **{**common, "max_position_embeddings": 40},
    )
    return transformers.RobertaForMaskedLM(config)


def batch() -> dict[str, object]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    labels = torch.full_like(ids, sparse_head.IGNORE)
    where = torch.rand(ids.shape, generator=g) < 0.3
    where[2, 8:] = False
    where[0, 1] = True
    labels[where] = ids[where]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
def test_loss_and_gradients_equal_the_dense_head(kind: str) -> None:
    model = tiny_mlm(kind)
    model.eval()  # no dropout: both passes see the same network
    inputs = batch()
    dense = model(**inputs)
    dense.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    handles = sparse_head.install(model)
    sparse = model(**inputs)
    sparse.loss.backward()
    labelled = int((inputs["labels"] != sparse_head.IGNORE).sum())
    assert sparse.logits.shape == (1, labelled, 50)
    assert torch.allclose(sparse.loss, dense.loss, atol=1e-6)
    for name, p in model.named_parameters():
        if name in want:
            assert torch.allclose(p.grad, want[name], atol=1e-6), name
    predicted = sparse_head.scatter(sparse.logits, inputs["labels"])
    expected = dense.logits.argmax(-1).masked_fill(inputs["labels"] == sparse_head.IGNORE, -100)
    assert torch.equal(predicted, expected)
    # Without labels (inference, export) the model is unchanged; removing the hooks undoes it.
    plain = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert plain.logits.shape == (3, 12, 50)
    for handle in handles:
        handle.remove()
    assert model(**inputs).logits.shape == (3, 12, 50)


def test_scatter_keeps_dense_logits_as_they_are() -> None:
    logits = torch.randn(2, 4, 7)
    labels = torch.zeros(2, 4, dtype=torch.long)
    assert torch.equal(sparse_head.scatter((logits,), labels), logits.argmax(-1))
