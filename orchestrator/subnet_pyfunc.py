"""The MLflow pyfunc of an exported subnet, logged as "model from code" (no pickle).

MLflow's pytorch flavour pickles the whole nn.Module; our exports are a state dict in
safetensors plus a JSON architecture, so the logged model is this file + the `subnet` artifact
(arch.json + model.safetensors) + the `search_space` package as code. Load it anywhere with
`mlflow.pyfunc.load_model(uri).predict(images)`: images (N, C, H, W) float32 -> logits (N, K).
This file runs on its own at load time: it imports nothing from orchestrator/.
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class SubnetModel(PythonModel):
    def load_context(self, context) -> None:
        from search_space.subnet import load_subnet

        self.model = load_subnet(context.artifacts["subnet"]).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))  # (N, C, H, W)
        with torch.no_grad():
            return self.model(x).numpy()  # (N, num_classes) logits


mlflow.models.set_model(SubnetModel())
