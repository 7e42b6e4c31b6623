"""What a model is conditioned on: class labels (DiT) or text (the video models).

A conditioning turns a training batch into the model's keyword inputs (with condition dropout, so
the model also learns the unconditional prediction that classifier-free guidance needs), and
turns prompts into conditional and unconditional inputs for sampling. Dropout is decided here,
from each sample's own draws (`SampleDraws`), never inside the model, so that it does not depend
on how samples are spread over ranks.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from videosys.data import Batch
from videosys.diffusion import SampleDraws
from videosys.encoders.text import LabelConditioner, TextConditioner


def model_accepts(model: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _drop_mask(batch: int, probability: float, device, draws: SampleDraws | None) -> torch.Tensor:
    u = torch.rand(batch, device=device) if draws is None else draws.uniform()
    return u < probability


class ClassConditioning:
    """Class labels; a `dropout_prob` fraction (the model's class_dropout_prob) becomes the null label."""

    def __init__(self, null_label: int | None, dropout_prob: float):
        self.null_label = null_label
        self.dropout_prob = dropout_prob if null_label is not None else 0.0

    def training_inputs(
        self, batch: Batch, device: torch.device, draws: SampleDraws | None = None
    ) -> dict[str, torch.Tensor]:
        labels = batch.y.to(device, non_blocking=True)
        if self.dropout_prob > 0:
            drop = _drop_mask(labels.shape[0], self.dropout_prob, device, draws)
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return {"y": labels}


class TextConditioning:
    """Text embeddings from a text encoder, from label tokens (text_encoder=none) or from a cache.

    The unconditional input is the model's own null caption when it has one (Open-Sora's fixed
    `y_embedding`, used with the conditional mask as published, and dropped in with the model's
    class_dropout_prob); otherwise the empty prompt, dropped in with `dropout_prob` (task.caption_dropout).
    """

    def __init__(
        self,
        model: nn.Module,
        conditioner: TextConditioner | None,
        dropout_prob: float,
        cached_null: tuple[torch.Tensor, torch.Tensor] | None = None,
        extra_inputs: dict | None = None,
    ):
        self.model_null = getattr(model, "null_text", None)
        self.conditioner = conditioner
        if self.model_null is not None:
            dropout_prob = model.config.class_dropout_prob
        self.dropout_prob = dropout_prob
        self.cached_null = cached_null
        self.extra_inputs = extra_inputs or {}

    def _null(self, batch: int, length: int, mask: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model_null is not None:
            return self.model_null(batch).to(device), mask
        if self.cached_null is not None:
            text, null_mask = self.cached_null
            return text.to(device).expand(batch, -1, -1), null_mask.to(device).expand(batch, -1)
        if isinstance(self.conditioner, LabelConditioner):
            return self.conditioner.null(batch, device, length=length)
        return self.conditioner.null(batch, device)

    def _encode_batch(self, batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor]:
        if "text" in batch.tensors:  # cached embeddings (task=preprocess)
            return batch.tensors["text"].to(device).float(), batch.tensors["text_mask"].to(device).bool()
        if isinstance(self.conditioner, LabelConditioner) and "label_tokens" in batch.tensors:
            return self.conditioner.encode_tokens(batch.tensors["label_tokens"].to(device))
        if self.conditioner is None or batch.captions is None:
            raise ValueError("this batch has neither captions nor cached text embeddings to condition on")
        return self.conditioner.encode(batch.captions, device)

    def training_inputs(
        self, batch: Batch, device: torch.device, draws: SampleDraws | None = None
    ) -> dict[str, torch.Tensor]:
        text, mask = self._encode_batch(batch, device)
        if self.dropout_prob > 0:
            null_text, null_mask = self._null(text.shape[0], text.shape[1], mask, device)
            if null_text.shape[1] != text.shape[1]:
                raise ValueError(
                    f"caption dropout swaps in the empty prompt, which has {null_text.shape[1]} tokens while the "
                    f"captions have {text.shape[1]}; encode both with the same text_encoder.max_length"
                )
            drop = _drop_mask(text.shape[0], self.dropout_prob, device, draws)
            text = torch.where(drop[:, None, None], null_text, text)
            mask = torch.where(drop[:, None], null_mask, mask)
        return {"text": text, "text_mask": mask, **self.extra_inputs}

    def prompt_inputs(self, prompts: list[str], device: torch.device, guided: bool) -> dict[str, torch.Tensor]:
        """Inputs for sampling `prompts`; with `guided`, the unconditional half follows the conditional one."""
        text, mask = self.conditioner.encode(prompts, device)
        if guided:
            null_text, null_mask = self._null(len(prompts), text.shape[1], mask, device)
            text, mask = torch.cat([text, null_text.to(text.dtype)]), torch.cat([mask, null_mask])
        return {"text": text, "text_mask": mask, **self.extra_inputs}
