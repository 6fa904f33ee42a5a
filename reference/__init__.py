"""trinity.reference: the NumPy definition of the AFMoE model that every backend and layout is pinned to.

Public entry points (each docstring cites its `SPEC §` section: docs/spec.md):
    Config, PRESETS                     configuration (SPEC §1, §2, §14)
    init_params, param_count, param_shapes
    logits(config, params, tokens, doc_ids=None)   forward → [B, T, V]
    model_forward                       forward keeping each operator's ctx for the backward
    load_pretrained, save_pretrained, to_hf_state_dict, from_hf_state_dict   HF checkpoint interop (SPEC §3)
"""

from .data.packing import document_ids
from .interop.hf import from_hf_state_dict, load_pretrained, save_pretrained, to_hf_state_dict
from .model.config import PRESETS, Config, ConfigError
from .model.model import logits, model_backward, model_forward
from .model.objective import evaluate_losses, loss_and_grads
from .model.params import check_params, init_params, param_count, param_shapes

__all__ = ["Config", "ConfigError", "PRESETS", "init_params", "param_count", "param_shapes", "check_params",
           "logits", "model_forward", "model_backward", "loss_and_grads", "evaluate_losses",
           "document_ids", "load_pretrained", "save_pretrained", "to_hf_state_dict", "from_hf_state_dict"]
