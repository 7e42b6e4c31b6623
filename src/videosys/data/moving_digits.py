"""Moving digits: captioned clips built from scikit-learn's bundled 8x8 digits (no download).

Each clip shows one digit of the training half of `digits_halves` travelling across a square
canvas of background (-1), from one edge to the other, in one of the configured directions. The
caption says what is shown ("a 3 moving left"); with text_encoder=none the caption maps to two
label tokens, the digit and the direction (`vocab`, `prompt_tokens`).

`MovingDigitsEvaluator` scores generated clips against their prompts: a digit classifier trained on
the held-out half recognises each frame, and the digit's centre of mass gives the direction.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset

from videosys.data.digits import DIGIT_LEVELS, digits_halves
from videosys.errors import ConfigError

DIRECTIONS = ("left", "right", "up", "down")
DIGIT_SIZE = 8  # sklearn's digits are 8x8
NUM_DIGITS = 10


@dataclass
class MovingDigitsDataConfig:
    name: str = "moving_digits"
    num_frames: int = 8
    frame_size: int = 16  # square canvas, in pixels
    directions: list[str] = field(default_factory=lambda: list(DIRECTIONS))
    split_seed: int = 0
    num_workers: int = 0
    fps: float = 8.0
    # Where the path runs across the motion: a random row/column per clip, or through the centre
    # (an easier task: the position in every frame follows from the direction alone).
    random_offset: bool = True

    def __post_init__(self) -> None:
        check_config(self)


def check_config(cfg: MovingDigitsDataConfig) -> None:
    if cfg.frame_size < DIGIT_SIZE + 2:
        raise ConfigError(
            f"data.frame_size={cfg.frame_size} is too small: an 8x8 digit needs room to move; use data.frame_size>=10"
        )
    if cfg.num_frames < 2:
        raise ConfigError(f"data.num_frames={cfg.num_frames} cannot show motion; use data.num_frames>=2")
    check_directions(cfg.directions)
    if not cfg.fps > 0:
        raise ConfigError(f"data.fps={cfg.fps} must be positive, e.g. data.fps=8")


def check_directions(directions) -> None:
    directions = list(directions)
    unknown = [d for d in directions if d not in DIRECTIONS]
    if not directions or unknown or len(set(directions)) != len(directions):
        raise ConfigError(
            f"data.directions={directions} must be a non-empty list of distinct directions from "
            f"{list(DIRECTIONS)}, e.g. data.directions=[left,right]"
        )


# ----------------------------------------------------------------------------- captions and tokens


def vocab(directions=DIRECTIONS) -> tuple[str, ...]:
    """The caption words whose positions are the label token ids: the ten digits, then the directions."""
    return (*(str(d) for d in range(NUM_DIGITS)), *directions)


MOVING_DIGITS_VOCAB = vocab()


def caption(digit: int, direction: str) -> str:
    return f"a {int(digit)} moving {direction}"


_PROMPT = re.compile(r"a\s+(\d)\s+moving\s+([a-z]+)")


def parse_prompt(prompt: str, directions=DIRECTIONS) -> tuple[int, int]:
    """'a 3 moving left' -> (3, index of 'left' in `directions`); anything else is a ConfigError."""
    directions = list(directions)
    match = _PROMPT.fullmatch(prompt.strip().lower()) if isinstance(prompt, str) else None
    if match is None or match.group(2) not in directions:
        raise ConfigError(
            f"prompt {prompt!r} is not a moving-digits caption; expected 'a <digit> moving <direction>' with "
            f"<digit> in 0..9 and <direction> in {directions}, e.g. {caption(3, directions[0])!r}"
        )
    return int(match.group(1)), directions.index(match.group(2))


def prompt_tokens(prompt: str, directions=DIRECTIONS) -> torch.Tensor:
    """The label tokens of a caption: LongTensor([digit, 10 + direction index])."""
    digit, direction = parse_prompt(prompt, directions)
    return torch.tensor([digit, NUM_DIGITS + direction], dtype=torch.long)


def default_prompts(directions=DIRECTIONS) -> list[str]:
    """Every digit with every direction, digit-major: 40 captions for the four default directions."""
    return [caption(digit, direction) for digit in range(NUM_DIGITS) for direction in directions]


# ----------------------------------------------------------------------------- rendering


def travel_positions(num_frames: int, frame_size: int, direction: str) -> np.ndarray:
    """Offset of the digit along the motion axis in each frame: edge to edge, rounded half up."""
    span = frame_size - DIGIT_SIZE
    forward = np.floor(np.arange(num_frames) * span / (num_frames - 1) + 0.5).astype(np.int64)
    return span - forward if direction in ("left", "up") else forward


def render_clip(digit_image: np.ndarray, direction: str, offset: int, num_frames: int, frame_size: int) -> np.ndarray:
    """An 8x8 digit on the 0..16 scale -> (T, S, S) float32 clip in [-1, 1] (background -1).

    `offset` is the digit's fixed position across the motion axis (its row for left/right, its
    column for up/down).
    """
    patch = np.asarray(digit_image, dtype=np.float32) / DIGIT_LEVELS * 2.0 - 1.0
    clip = np.full((num_frames, frame_size, frame_size), -1.0, dtype=np.float32)
    horizontal = direction in ("left", "right")
    for t, pos in enumerate(travel_positions(num_frames, frame_size, direction)):
        top, left = (offset, pos) if horizontal else (pos, offset)
        clip[t, top : top + DIGIT_SIZE, left : left + DIGIT_SIZE] = patch
    return clip


class MovingDigitsDataset(Dataset):
    """Item i shows training image i // len(directions) moving in direction i % len(directions)."""

    num_classes = 0

    def __init__(self, cfg: MovingDigitsDataConfig):
        check_config(cfg)
        self.cfg = cfg
        self.directions = list(cfg.directions)
        self.images, self.labels = digits_halves(cfg.split_seed)["train"]

    @property
    def vocab(self) -> tuple[str, ...]:
        return vocab(self.directions)

    def default_prompts(self) -> list[str]:
        """What sampling generates unless told otherwise: every digit moving in every direction."""
        return default_prompts(self.directions)

    def __len__(self) -> int:
        return len(self.labels) * len(self.directions)

    def __getitem__(self, key: tuple[int, int]):
        index, augment_seed = key
        image_index, direction_index = divmod(int(index), len(self.directions))
        direction = self.directions[direction_index]
        digit = int(self.labels[image_index])
        free = self.cfg.frame_size - DIGIT_SIZE
        offset = random.Random(augment_seed).randint(0, free) if self.cfg.random_offset else free // 2
        clip = render_clip(self.images[image_index], direction, offset, self.cfg.num_frames, self.cfg.frame_size)
        return {
            "x": torch.from_numpy(clip).unsqueeze(0),
            "caption": caption(digit, direction),
            "label_tokens": torch.tensor([digit, NUM_DIGITS + direction_index], dtype=torch.long),
        }

    @cached_property
    def evaluator(self) -> MovingDigitsEvaluator:
        return MovingDigitsEvaluator(self.cfg.split_seed, self.cfg.frame_size, self.cfg.num_frames, self.directions)


# ----------------------------------------------------------------------------- evaluation

# A frame whose total intensity (0..16 scale) is below one full-ink pixel shows no digit.
MIN_FRAME_MASS = DIGIT_LEVELS
# A clip moves in a direction when its centre of mass travels at least this many pixels that way
# over the clip (a real clip travels frame_size - 8 >= 2) and more than it drifts across.
MIN_DISPLACEMENT = 1.0
# The localiser looks only at ink above this fraction of the frame's brightest pixel, so faint
# background noise does not drag the crop window around.
LOCALISE_FLOOR = 0.5
# Windows holding as much strong ink as the best one (up to round-off) are ties, resolved towards
# the centre of mass: a digit with blank border columns fits several windows equally well.
TIE_TOLERANCE = 1e-6


def to_mass(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Frames in [-1, 1] -> float64 ink on the 0..16 scale of sklearn's digits (negatives clamped)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    return np.clip((np.asarray(frames, dtype=np.float64) + 1.0) / 2.0 * DIGIT_LEVELS, 0.0, DIGIT_LEVELS)


def centre_of_mass(mass: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M, H, W) ink -> row and column of its centre of mass, NaN where a frame holds no digit, and that mask."""
    total = mass.sum(axis=(1, 2))
    present = total >= MIN_FRAME_MASS
    safe = np.where(present, total, 1.0)
    rows = (mass.sum(axis=2) * np.arange(mass.shape[1])).sum(axis=1) / safe
    cols = (mass.sum(axis=1) * np.arange(mass.shape[2])).sum(axis=1) / safe
    return np.where(present, rows, np.nan), np.where(present, cols, np.nan), present


def localise(mass: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, H, W) ink -> (M, 8, 8) crops around the digit, and a mask of the frames that show one.

    The window is the 8x8 one holding the most strong ink (ink above LOCALISE_FLOOR of the frame's
    maximum, less that floor); among windows within TIE_TOLERANCE of the best, the one whose centre
    is nearest the strong ink's centre of mass wins. Crops keep the full ink, as the classifier sees it.
    """
    m, height, width = mass.shape
    d = DIGIT_SIZE
    if height < d or width < d:
        raise ConfigError(f"frames of {height}x{width} pixels are smaller than a digit (8x8); cannot score them")
    strong = np.clip(mass - LOCALISE_FLOOR * mass.max(axis=(1, 2), keepdims=True), 0.0, None)
    integral = np.zeros((m, height + 1, width + 1))
    integral[:, 1:, 1:] = strong.cumsum(axis=1).cumsum(axis=2)
    windows = integral[:, d:, d:] - integral[:, :-d, d:] - integral[:, d:, :-d] + integral[:, :-d, :-d]
    total = np.maximum(strong.sum(axis=(1, 2)), 1e-12)
    com_rows = (strong.sum(axis=2) * np.arange(height)).sum(axis=1) / total
    com_cols = (strong.sum(axis=1) * np.arange(width)).sum(axis=1) / total
    tops = np.arange(height - d + 1)[None, :, None] + (d - 1) / 2
    lefts = np.arange(width - d + 1)[None, None, :] + (d - 1) / 2
    distance = (tops - com_rows[:, None, None]) ** 2 + (lefts - com_cols[:, None, None]) ** 2
    best = windows.reshape(m, -1).max(axis=1)[:, None, None]
    score = np.where(windows >= best - TIE_TOLERANCE, -distance, -np.inf).reshape(m, -1)
    top, left = np.divmod(score.argmax(axis=1), width - d + 1)
    rows = top[:, None, None] + np.arange(d)[None, :, None]
    cols = left[:, None, None] + np.arange(d)[None, None, :]
    crops = mass[np.arange(m)[:, None, None], rows, cols]
    return crops, mass.sum(axis=(1, 2)) >= MIN_FRAME_MASS


class MovingDigitsEvaluator:
    """Scores clips against 'a <digit> moving <direction>' prompts.

    digit_accuracy: fraction of all frames whose localised 8x8 crop an RBF SVM (trained only on the
    held-out half, pasted at random canvas positions and cropped by the same localiser) classifies
    as the prompted digit. direction_accuracy: fraction of clips whose centre of mass (least-squares
    slope over the frames that show a digit) moves the prompted way. Blank frames are misses.

    `real_digit_accuracy` / `real_direction_accuracy` are the same scores on real clips rendered
    from the training half, which the classifier never saw.
    """

    def __init__(
        self,
        split_seed: int = 0,
        frame_size: int = 16,
        num_frames: int = 8,
        directions=DIRECTIONS,
        pastes_per_digit: int = 2,
    ):
        from sklearn.svm import SVC

        check_directions(directions)
        self.directions = list(directions)
        self.frame_size = frame_size
        halves = digits_halves(split_seed)
        rng = np.random.default_rng(split_seed)

        x_held, y_held = halves["held_out"]
        span = frame_size - DIGIT_SIZE
        canvases = np.full((len(x_held) * pastes_per_digit, frame_size, frame_size), -1.0)
        patches = x_held / DIGIT_LEVELS * 2.0 - 1.0
        for i, (top, left) in enumerate(rng.integers(0, span + 1, (len(canvases), 2))):
            canvases[i, top : top + DIGIT_SIZE, left : left + DIGIT_SIZE] = patches[i % len(x_held)]
        crops, _ = localise(to_mass(canvases))
        labels = np.tile(y_held, pastes_per_digit)
        self.model = SVC(gamma=0.001, C=10.0).fit(crops.reshape(len(crops), -1), labels)

        # Sanity figures on real clips: every training image once, in a random direction and offset.
        x_train, y_train = halves["train"]
        clips, prompts = [], []
        for image, digit in zip(x_train, y_train, strict=True):
            direction = self.directions[int(rng.integers(len(self.directions)))]
            offset = int(rng.integers(0, span + 1))
            clips.append(render_clip(image, direction, offset, num_frames, frame_size))
            prompts.append(caption(digit, direction))
        real = self.evaluate(torch.from_numpy(np.stack(clips)).unsqueeze(1), prompts)
        self.real_digit_accuracy = real["digit_accuracy"]
        self.real_direction_accuracy = real["direction_accuracy"]

    def predict_digits(self, frames: torch.Tensor | np.ndarray) -> np.ndarray:
        """(M, H, W) frames in [-1, 1] -> predicted digit per frame, -1 where a frame shows nothing."""
        crops, present = localise(to_mass(frames))
        predicted = np.full(len(crops), -1, dtype=np.int64)
        if present.any():
            predicted[present] = self.model.predict(crops[present].reshape(int(present.sum()), -1))
        return predicted

    def directions_moved(self, clips: np.ndarray, prompted: np.ndarray) -> np.ndarray:
        """(N, T, H, W) ink and prompted direction indices -> whether each clip moves that way."""
        n, t = clips.shape[:2]
        rows, cols, present = centre_of_mass(clips.reshape(n * t, *clips.shape[2:]))
        rows, cols, present = rows.reshape(n, t), cols.reshape(n, t), present.reshape(n, t)
        moved = np.zeros(n, dtype=bool)
        time = np.arange(t, dtype=np.float64)
        for i in range(n):
            seen = present[i]
            if seen.sum() < 2:
                continue
            ts = time[seen] - time[seen].mean()
            # Least-squares slope (pixels per frame) times the clip length: the fitted displacement.
            d_row = float((ts * rows[i, seen]).sum() / (ts**2).sum()) * (t - 1)
            d_col = float((ts * cols[i, seen]).sum() / (ts**2).sum()) * (t - 1)
            direction = self.directions[int(prompted[i])]
            along, across = {
                "left": (-d_col, d_row),
                "right": (d_col, d_row),
                "up": (-d_row, d_col),  # row index grows downward
                "down": (d_row, d_col),
            }[direction]
            moved[i] = along >= MIN_DISPLACEMENT and along > abs(across)
        return moved

    def evaluate(self, videos: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """videos: (N, 1 or 3, T, H, W) in [-1, 1] (RGB is averaged to grey); prompts: N captions."""
        if videos.ndim != 5 or videos.shape[1] not in (1, 3):
            raise ConfigError(f"videos of shape {tuple(videos.shape)} are not (N, 1 or 3, T, H, W) clips")
        if len(prompts) != videos.shape[0]:
            raise ConfigError(f"got {videos.shape[0]} videos but {len(prompts)} prompts; give one prompt per video")
        parsed = np.array([parse_prompt(p, self.directions) for p in prompts], dtype=np.int64).reshape(-1, 2)
        grey = videos.detach().float().cpu().mean(dim=1).numpy()  # (N, T, H, W)
        n, t = grey.shape[:2]
        if n == 0:
            return {"digit_accuracy": 0.0, "direction_accuracy": 0.0}
        predicted = self.predict_digits(grey.reshape(n * t, *grey.shape[2:])).reshape(n, t)
        digit_hits = predicted == parsed[:, :1]
        moved = self.directions_moved(to_mass(grey), parsed[:, 1])
        return {"digit_accuracy": float(digit_hits.mean()), "direction_accuracy": float(moved.mean())}
