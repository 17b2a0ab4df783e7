"""The exported package as an MLflow model (logged from this file's code, no pickle).

`mlflow.pyfunc.load_model("models:/<name>@production")` gives a model whose `predict` takes a
DataFrame with a `text` column (or a list of strings) and returns one JSON prediction per text,
as `bertrt` makes it (label and score, entities, or fills). The package folder itself is the
artifact `package`, its signature (`model.sig`, when the release was signed) inside it;
`bertrt.load("models:/<name>@production")` opens it without this wrapper.

With a public key, `model_config={"public_key": "key.pub"}` at load or `BERTRT_PUBLIC_KEY`, the
folder's signature is checked before it is read, and an unsigned or changed one is refused.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import pandas as pd

PACKAGE = "package"  # the artifact key of the exported model folder


class PackageModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        import bertrt

        config = getattr(context, "model_config", None) or {}
        self.predictor = bertrt.load(
            context.artifacts[PACKAGE], public_key=config.get("public_key") or None
        )

    def predict(self, context: Any, model_input: Any, params: dict | None = None) -> Any:
        if isinstance(model_input, pd.DataFrame):
            texts = model_input["text"].astype(str).tolist()
        else:
            texts = [str(t) for t in model_input]
        predictions = self.predictor.predict(texts)
        return pd.DataFrame(
            {"prediction": [json.dumps(p.as_dict(), ensure_ascii=False) for p in predictions]}
        )


mlflow.models.set_model(PackageModel())
