"""scikit-learn's bundled handwritten digits (8x8, 10 classes): a dataset that needs no download.

The 1797 images are split in two stratified halves: the model trains on one, and a classifier
trained on the other ("held-out") half scores how recognisable generated digits are.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset

DIGIT_LEVELS = 16.0  # pixel values in sklearn's digits run 0..16


@dataclass
class DigitsDataConfig:
    name: str = "digits"
    split_seed: int = 0
    num_workers: int = 0


def digits_halves(split_seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_held, y_train, y_held = train_test_split(
        digits.images, digits.target, test_size=0.5, stratify=digits.target, random_state=split_seed
    )
    return {"train": (x_train, y_train), "held_out": (x_held, y_held)}


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """0..16 pixel values -> (N, 1, 8, 8) floats in [-1, 1]."""
    return torch.as_tensor(images / DIGIT_LEVELS * 2.0 - 1.0, dtype=torch.float32).reshape(-1, 1, 8, 8)


def to_pixel_range(samples: torch.Tensor) -> np.ndarray:
    """(N, 1, 8, 8) samples in [-1, 1] -> (N, 64) features on the 0..16 scale the classifier saw."""
    pixels = ((samples.detach().float().cpu().clamp(-1, 1) + 1.0) / 2.0 * DIGIT_LEVELS).numpy()
    return pixels.reshape(pixels.shape[0], -1)


class DigitsDataset(Dataset):
    num_classes = 10

    def __init__(self, cfg: DigitsDataConfig):
        self.cfg = cfg
        images, labels = digits_halves(cfg.split_seed)["train"]
        self.images = to_model_range(images)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]):
        index, _ = key
        return self.images[index], self.labels[index]

    @cached_property
    def evaluator(self) -> DigitClassifier:
        return DigitClassifier(self.cfg.split_seed)


class DigitClassifier:
    """An RBF SVM trained on the held-out half; `accuracy` scores generated samples against their labels."""

    def __init__(self, split_seed: int):
        from sklearn.svm import SVC

        halves = digits_halves(split_seed)
        x_held, y_held = halves["held_out"]
        self.model = SVC(gamma=0.001, C=10.0).fit(x_held.reshape(len(x_held), -1), y_held)
        x_train, y_train = halves["train"]
        # Sanity figure: the same classifier on real digits it never saw.
        self.real_accuracy = float(self.model.score(x_train.reshape(len(x_train), -1), y_train))

    def accuracy(self, samples: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = self.model.predict(to_pixel_range(samples))
        return float((predicted == labels.cpu().numpy()).mean())
