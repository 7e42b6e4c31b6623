"""Video data: moving digits (clips, captions, evaluator), the video folder reader, and video output."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from videosys.data import DATA_CONFIGS, BadSample, build_dataset
from videosys.data.digits import digits_halves
from videosys.data.moving_digits import (
    MOVING_DIGITS_VOCAB,
    MovingDigitsDataConfig,
    MovingDigitsDataset,
    MovingDigitsEvaluator,
    caption,
    centre_of_mass,
    default_prompts,
    localise,
    parse_prompt,
    prompt_tokens,
    to_mass,
    vocab,
)
from videosys.data.video_folder import VideoFolderDataConfig, VideoFolderDataset, read_video_frames
from videosys.errors import ConfigError
from videosys.tasks.media import save_video_grid, video_grid, write_gif, write_video

# ----------------------------------------------------------------------------- moving digits


@pytest.fixture(scope="module")
def moving() -> MovingDigitsDataset:
    return MovingDigitsDataset(MovingDigitsDataConfig())


@pytest.fixture(scope="module")
def evaluator(moving) -> MovingDigitsEvaluator:
    return moving.evaluator


@pytest.fixture(scope="module")
def real_clips(moving) -> tuple[torch.Tensor, list[str]]:
    """Every 9th training clip (digits and directions all represented)."""
    items = [moving[(i, 1000 + i)] for i in range(0, len(moving), 9)]
    return torch.stack([item["x"] for item in items]), [item["caption"] for item in items]


def test_moving_digits_pixels_follow_the_captioned_direction(moving):
    images, labels = digits_halves(0)["train"]
    assert len(moving) == len(labels) * 4
    expected_travel = {
        "left": [8, 7, 6, 5, 3, 2, 1, 0],  # 8 pixels over 7 steps, rounded half up
        "right": [0, 1, 2, 3, 5, 6, 7, 8],
        "up": [8, 7, 6, 5, 3, 2, 1, 0],
        "down": [0, 1, 2, 3, 5, 6, 7, 8],
    }
    for index in (0, 1, 2, 3, 4 * 37 + 2, 4 * 500 + 3):
        image_index, direction_index = divmod(index, 4)
        direction = ["left", "right", "up", "down"][direction_index]
        item = moving[(index, 77 + index)]
        digit = int(labels[image_index])
        assert item["caption"] == f"a {digit} moving {direction}"
        assert item["label_tokens"].tolist() == [digit, 10 + direction_index]
        x = item["x"]
        assert x.shape == (1, 8, 16, 16) and x.dtype == torch.float32
        patch = torch.as_tensor(images[image_index] / 16.0 * 2.0 - 1.0, dtype=torch.float32)
        # The perpendicular offset is the same in every frame: find it from frame 0.
        horizontal = direction in ("left", "right")
        offsets = [
            o
            for o in range(9)
            if torch.equal(
                x[0, 0, o : o + 8, expected_travel[direction][0] : expected_travel[direction][0] + 8]
                if horizontal
                else x[0, 0, expected_travel[direction][0] : expected_travel[direction][0] + 8, o : o + 8],
                patch,
            )
        ]
        assert offsets, f"digit not found at the expected place for index {index}"
        offset = offsets[0]
        for t, pos in enumerate(expected_travel[direction]):
            top, left = (offset, pos) if horizontal else (pos, offset)
            frame = x[0, t].clone()
            assert torch.equal(frame[top : top + 8, left : left + 8], patch)
            frame[top : top + 8, left : left + 8] = -1.0
            assert torch.all(frame == -1.0), "pixels outside the digit must be background"
        rows, cols, present = centre_of_mass(to_mass(x[0]))
        assert present.all()
        d_row, d_col = rows[-1] - rows[0], cols[-1] - cols[0]
        moved = {"left": -d_col, "right": d_col, "up": -d_row, "down": d_row}[direction]
        across = d_row if horizontal else d_col
        assert moved == pytest.approx(8.0) and across == pytest.approx(0.0)


def test_moving_digits_is_deterministic_per_key(moving):
    a, b = moving[(5, 123)], moving[(5, 123)]
    assert torch.equal(a["x"], b["x"]) and a["caption"] == b["caption"]
    # The augmentation seed moves the digit across the motion axis, never along it.
    offsets = {tuple(centre_of_mass(to_mass(moving[(5, seed)]["x"][0]))[0].round(3)) for seed in range(40)}
    assert len(offsets) > 3


def test_captions_tokens_and_vocab_agree(moving):
    assert MOVING_DIGITS_VOCAB == ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "left", "right", "up", "down")
    prompts = default_prompts()
    assert len(prompts) == 40 and len(set(prompts)) == 40
    for index in range(0, len(moving), 97):
        item = moving[(index, index)]
        assert torch.equal(prompt_tokens(item["caption"]), item["label_tokens"])
        words = item["caption"].split()
        assert [MOVING_DIGITS_VOCAB[t] for t in item["label_tokens"].tolist()] == [words[1], words[3]]
    assert vocab(["up", "down"]) == (*[str(d) for d in range(10)], "up", "down")
    assert prompt_tokens("a 7 moving down", ["up", "down"]).tolist() == [7, 11]
    assert caption(4, "right") == "a 4 moving right"


def test_parse_prompt_accepts_captions_only():
    assert parse_prompt("a 3 moving left") == (3, 0)
    assert parse_prompt("  A 9   Moving DOWN ") == (9, 3)
    assert parse_prompt("a 0 moving up", ["up"]) == (0, 0)
    for bad in [
        "a 3 moving sideways",
        "a 12 moving left",
        "3 moving left",
        "a 3 moving left.",
        "a three moving up",
        "",
    ]:
        with pytest.raises(ConfigError, match="a <digit> moving <direction>") as err:
            parse_prompt(bad)
        assert repr(bad) in str(err.value)
    with pytest.raises(ConfigError, match="'a 3 moving left'"):
        parse_prompt("a 3 moving left", ["up", "down"])


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"frame_size": 9}, "data.frame_size=9"),
        ({"num_frames": 1}, "data.num_frames=1"),
        ({"directions": []}, "data.directions=[]"),
        ({"directions": ["left", "left"]}, "data.directions="),
        ({"directions": ["left", "north"]}, "data.directions="),
    ],
)
def test_moving_digits_config_is_validated(overrides, key):
    with pytest.raises(ConfigError) as err:
        MovingDigitsDataConfig(**overrides)
    assert key in str(err.value)


def test_build_dataset_registers_video_data(tmp_path):
    assert DATA_CONFIGS["moving_digits"] is MovingDigitsDataConfig
    assert DATA_CONFIGS["video_folder"] is VideoFolderDataConfig
    dataset, spec = build_dataset(MovingDigitsDataConfig(num_frames=4, frame_size=12, directions=["up", "right"]))
    assert (spec.channels, spec.image_size, spec.width, spec.num_frames, spec.num_classes) == (1, 12, 12, 4, 0)
    assert spec.space == "pixel" and spec.fps == 8.0 and spec.label_vocab[-2:] == ("up", "right")
    item = dataset[(1, 0)]
    assert item["x"].shape == (1, 4, 12, 12) and item["caption"].endswith("moving right")

    write_video(np.zeros((6, 8, 8, 3), np.uint8), tmp_path / "a.mp4", fps=12.0)
    (tmp_path / "captions.csv").write_text("path,caption\na.mp4,black\n")
    dataset, spec = build_dataset(VideoFolderDataConfig(root=str(tmp_path), num_frames=3, frame_stride=2, height=4))
    assert (spec.channels, spec.image_size, spec.width, spec.num_frames, spec.label_vocab) == (3, 4, 64, 3, ())
    assert spec.fps == pytest.approx(6.0)  # 12 fps, every second frame


def test_localiser_crops_the_digit_wherever_it_is():
    images, _ = digits_halves(0)["held_out"]
    positions = np.random.default_rng(0).integers(0, 9, (len(images), 2))
    canvases = np.full((len(images), 16, 16), -1.0)
    for i, (top, left) in enumerate(positions):
        canvases[i, top : top + 8, left : left + 8] = images[i] / 16.0 * 2 - 1
    crops, present = localise(to_mass(canvases))
    assert present.all()
    # Digits leave border columns blank, so the window may shift within the blank margin; it keeps
    # all the ink of nearly every digit and at least 90% of every digit's ink.
    kept = crops.sum(axis=(1, 2)) / images.sum(axis=(1, 2))
    assert kept.min() >= 0.9 and (kept == 1.0).mean() >= 0.99
    # Where the ink touches all four borders only the pasted window holds all of it.
    framed = [i for i, im in enumerate(images) if im[[0, 7]].any(axis=1).all() and im[:, [0, 7]].any(axis=0).all()]
    assert framed
    for i in framed:
        np.testing.assert_array_equal(crops[i], images[i])
    blank, present = localise(np.zeros((2, 12, 10)))
    assert blank.shape == (2, 8, 8) and not present.any()


def test_evaluator_scores_real_clips_high(evaluator, real_clips):
    assert evaluator.real_digit_accuracy >= 0.95
    assert evaluator.real_direction_accuracy == 1.0
    videos, prompts = real_clips
    scores = evaluator.evaluate(videos, prompts)
    assert scores["digit_accuracy"] >= 0.95 and scores["direction_accuracy"] == 1.0
    rgb = evaluator.evaluate(videos.expand(-1, 3, -1, -1, -1), prompts)
    assert rgb == scores
    # Mild noise, as a generator would leave, barely matters.
    noisy = (videos + 0.1 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert evaluator.evaluate(noisy, prompts)["digit_accuracy"] >= 0.9


def test_evaluator_scores_wrong_prompts_and_blank_videos_low(evaluator, real_clips):
    videos, prompts = real_clips
    reverse = {"left": "right", "right": "left", "up": "down", "down": "up"}
    shifted_digits = [caption((parse_prompt(p)[0] + 1) % 10, p.split()[-1]) for p in prompts]
    reversed_dirs = [caption(parse_prompt(p)[0], reverse[p.split()[-1]]) for p in prompts]
    turned = [
        caption(parse_prompt(p)[0], {"left": "up", "right": "down", "up": "left", "down": "right"}[p.split()[-1]])
        for p in prompts
    ]
    wrong_digit = evaluator.evaluate(videos, shifted_digits)
    assert wrong_digit["digit_accuracy"] <= 0.05 and wrong_digit["direction_accuracy"] == 1.0
    wrong_direction = evaluator.evaluate(videos, reversed_dirs)
    assert wrong_direction["digit_accuracy"] >= 0.95 and wrong_direction["direction_accuracy"] == 0.0
    assert evaluator.evaluate(videos, turned)["direction_accuracy"] == 0.0
    blank = evaluator.evaluate(torch.full_like(videos, -1.0), prompts)
    assert blank == {"digit_accuracy": 0.0, "direction_accuracy": 0.0}
    frozen = evaluator.evaluate(videos[:, :, :1].expand_as(videos), prompts)
    assert frozen["direction_accuracy"] == 0.0
    # A clip whose digit vanishes after the first frame: those frames miss, and no motion is seen.
    vanishing = videos[:4].clone()
    vanishing[:, :, 1:] = -1.0
    result = evaluator.evaluate(vanishing, prompts[:4])
    assert result["digit_accuracy"] <= 1 / 8 and result["direction_accuracy"] == 0.0
    with pytest.raises(ConfigError, match="one prompt per video"):
        evaluator.evaluate(videos[:2], prompts[:3])


# ----------------------------------------------------------------------------- video folder


def index_frames(count: int, height: int = 24, width: int = 32) -> np.ndarray:
    """Frame t is a flat grey of brightness 10 * t + 5: the frame index can be read back."""
    return np.stack([np.full((height, width, 3), 10 * t + 5, np.uint8) for t in range(count)])


def decoded_index(clip: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> the frame index each frame encodes."""
    level = ((clip + 1) * 127.5).mean(dim=(0, 2, 3)).numpy()
    return (level - 5) / 10


@pytest.fixture
def video_folder(tmp_path) -> Path:
    root = tmp_path / "videos"
    write_video(index_frames(20), root / "long.mp4", fps=10.0)
    write_video(index_frames(5, 30, 18), root / "clips" / "short.mp4", fps=10.0)
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with open(root / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows(
            [
                ["long.mp4", "a grey ramp, slowly"],
                ["clips/short.mp4", "too short"],
                ["corrupt.mp4", "noise"],
                ["missing.mp4", "nothing"],
            ]
        )
    return root


def test_read_video_frames_decodes_and_stops_early(video_folder):
    frames = read_video_frames(video_folder / "long.mp4")
    assert frames.shape == (20, 24, 32, 3) and frames.dtype == np.uint8
    np.testing.assert_allclose(frames.mean(axis=(1, 2, 3)), 10 * np.arange(20) + 5, atol=3)
    assert read_video_frames(video_folder / "long.mp4", max_frames=4).shape[0] == 4


def test_video_folder_samples_strided_clips(video_folder):
    cfg = VideoFolderDataConfig(root=str(video_folder), num_frames=5, frame_stride=3, height=16, width=16)
    dataset = VideoFolderDataset(cfg)
    assert len(dataset) == 4 and dataset.fps == pytest.approx(10.0 / 3)
    starts = set()
    for seed in range(12):
        item = dataset[(0, seed)]
        assert item["caption"] == "a grey ramp, slowly"
        x = item["x"]
        assert x.shape == (3, 5, 16, 16) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        index = decoded_index(x)
        start = round(index[0])
        np.testing.assert_allclose(index, start + 3 * np.arange(5), atol=1.0)  # 10 levels apart, atol 10/255
        assert 0 <= start <= 20 - 13
        starts.add(start)
        assert torch.equal(x, dataset[(0, seed)]["x"]), "the clip must depend only on the key"
    assert len(starts) > 2, "the start frame should vary with the augmentation seed"


def test_video_folder_counts_frames_when_the_container_does_not(tmp_path):
    # Matroska does not store a frame count: the reader decodes the file to count, then samples.
    from fractions import Fraction

    with av.open(str(tmp_path / "ramp.mkv"), "w") as container:
        stream = container.add_stream("mpeg4", rate=Fraction(10))
        stream.width, stream.height, stream.pix_fmt = 32, 24, "yuv420p"
        for array in index_frames(12):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    with av.open(str(tmp_path / "ramp.mkv")) as container:
        assert container.streams.video[0].frames == 0
    (tmp_path / "captions.csv").write_text("path,caption\nramp.mkv,ramp\n")
    dataset = VideoFolderDataset(VideoFolderDataConfig(root=str(tmp_path), num_frames=4, frame_stride=3))
    assert dataset.fps == pytest.approx(10 / 3)
    for seed in range(4):
        index = decoded_index(dataset[(0, seed)]["x"])
        np.testing.assert_allclose(index, round(index[0]) + 3 * np.arange(4), atol=1.0)
    too_long = VideoFolderDataset(VideoFolderDataConfig(root=str(tmp_path), num_frames=5, frame_stride=3))[(0, 0)]
    assert isinstance(too_long, BadSample) and too_long.reason.startswith("has 12 frames, needs 13")


def test_video_folder_resizes_to_cover_and_centre_crops(tmp_path):
    frames = np.zeros((3, 20, 40, 3), np.uint8)
    frames[:, :, 10:30] = 255  # a white centre band 20 px wide; the sides are black
    write_video(frames, tmp_path / "band.mp4", fps=5.0)
    (tmp_path / "captions.csv").write_text("path,caption\nband.mp4,band\n")
    cfg = VideoFolderDataConfig(root=str(tmp_path), num_frames=2, height=10, width=10, random_flip=True)
    x = VideoFolderDataset(cfg)[(0, 3)]["x"]
    # Scale 0.5 -> 10x20, centre crop 10x10 keeps just the white band.
    assert x.shape == (3, 2, 10, 10) and x.mean() > 0.9


def test_video_folder_bad_files_become_bad_samples(video_folder):
    # 5 frames are exactly enough for 3 frames at stride 2, not for 9.
    exact = VideoFolderDataset(VideoFolderDataConfig(root=str(video_folder), num_frames=3, frame_stride=2))[(1, 0)]
    assert not isinstance(exact, BadSample) and exact["x"].shape == (3, 3, 64, 64)
    np.testing.assert_allclose(decoded_index(exact["x"]), [0, 2, 4], atol=1.0)
    dataset = VideoFolderDataset(VideoFolderDataConfig(root=str(video_folder), num_frames=9, frame_stride=2))
    short = dataset[(1, 0)]
    assert isinstance(short, BadSample) and short.path.endswith("short.mp4")
    assert short.reason == "has 5 frames, needs 17 for num_frames=9 frame_stride=2"
    corrupt = dataset[(2, 0)]
    assert isinstance(corrupt, BadSample) and corrupt.path.endswith("corrupt.mp4") and "decode" in corrupt.reason
    missing = dataset[(3, 0)]
    assert isinstance(missing, BadSample) and "not found" in missing.reason
    assert not isinstance(dataset[(0, 0)], BadSample)


def test_video_folder_fails_early_on_bad_paths(tmp_path, video_folder):
    with pytest.raises(ConfigError, match="data.root"):
        VideoFolderDataset(VideoFolderDataConfig())
    with pytest.raises(FileNotFoundError, match=r"data.root=.*nope does not exist"):
        VideoFolderDataset(VideoFolderDataConfig(root=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match="data.captions=other.csv"):
        VideoFolderDataset(VideoFolderDataConfig(root=str(video_folder), captions="other.csv"))
    (video_folder / "bad.csv").write_text("file,text\nlong.mp4,x\n")
    with pytest.raises(ConfigError, match=r"data.captions=bad.csv .*'path' and 'caption'"):
        VideoFolderDataset(VideoFolderDataConfig(root=str(video_folder), captions="bad.csv"))
    (video_folder / "empty.csv").write_text("path,caption\n")
    with pytest.raises(ConfigError, match="data.captions=.*empty.csv.* lists no videos"):
        VideoFolderDataset(VideoFolderDataConfig(root=str(video_folder), captions=str(video_folder / "empty.csv")))
    with pytest.raises(ConfigError, match="data.frame_stride=0"):
        VideoFolderDataConfig(root=str(video_folder), frame_stride=0)


# ----------------------------------------------------------------------------- media


@pytest.mark.parametrize("codec", [None, "mpeg4"])
def test_write_video_round_trips(tmp_path, codec):
    frames = index_frames(9, 15, 21)  # odd sizes are padded to even
    frames[:, 2:6, 3:9] = 230
    path = tmp_path / "out" / "clip.mp4"
    write_video(frames, path, fps=8.0, codec=codec)
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.mp4"], "no temporary file may remain"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert float(stream.average_rate) == pytest.approx(8.0)
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    assert decoded.shape == (9, 16, 22, 3)
    np.testing.assert_allclose(decoded[:, :15, :21].astype(float), frames.astype(float), atol=10)


def test_write_gif_round_trips(tmp_path):
    frames = index_frames(6, 10, 12)
    frames[:, 1:4, 2:5] = [200, 30, 60]
    path = tmp_path / "clip.gif"
    write_gif(frames, path, fps=10.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]
    with Image.open(path) as image:
        assert image.n_frames == 6 and image.size == (12, 10) and image.info["loop"] == 0
        assert image.info["duration"] == 100
        decoded = []
        for i in range(image.n_frames):
            image.seek(i)
            decoded.append(np.asarray(image.convert("RGB")))
    np.testing.assert_allclose(np.stack(decoded).astype(float), frames.astype(float), atol=8)


def test_video_grid_layout():
    # 5 clips of 2 frames, 1 x 2 x 3 pixels; clip i frame t is uniformly (i - 2) / 4 + t / 8.
    videos = torch.stack(
        [torch.full((1, 2, 2, 3), (i - 2) / 4) + torch.tensor([0.0, 0.125])[:, None, None] for i in range(5)]
    )
    grid = video_grid(videos, rows=2, upscale=2, pad=1)
    # 3 columns of 6 px + 4 pads = 22 wide; 2 rows of 4 px + 3 pads = 11 high
    assert grid.shape == (2, 11, 22, 3) and grid.dtype == np.uint8
    for i in range(5):
        r, c = divmod(i, 3)
        top, left = 1 + r * 5, 1 + c * 7
        for t in range(2):
            expected = round(((i - 2) / 4 + t / 8 + 1) * 127.5)
            cell = grid[t, top : top + 4, left : left + 6]
            assert np.all(cell == expected), (i, t)
    assert np.all(grid[:, 0] == 255) and np.all(grid[:, :, 0] == 255)
    assert np.all(grid[:, 6:, 15:] == 255), "the sixth cell (none) stays white"
    rgb = video_grid(
        torch.stack([torch.tensor([-1.0, 0.0, 1.0])[:, None, None, None].expand(3, 1, 2, 2)]), rows=1, pad=0
    )
    assert rgb.shape == (1, 2, 2, 3) and rgb[0, 0, 0].tolist() == [0, 128, 255]


def test_save_video_grid_writes_mp4_and_gif(tmp_path):
    videos = torch.rand(4, 1, 3, 16, 16) * 2 - 1
    paths = save_video_grid(videos, rows=2, stem=tmp_path / "samples.step1", fps=4.0)
    assert paths == {"mp4": tmp_path / "samples.step1.mp4", "gif": tmp_path / "samples.step1.gif"}
    with Image.open(paths["gif"]) as image:
        # upscale 4 makes each 16 px clip 64 px: 2 x (64 + 1) + 1 = 131
        assert image.size == (131, 131) and image.n_frames == 3
    with av.open(str(paths["mp4"])) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (132, 132) and stream.frames == 3
