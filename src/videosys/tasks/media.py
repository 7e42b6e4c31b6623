"""Writing generated media: a PNG grid of images (one row per class), video grids as MP4 and GIF."""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_image_grid(images: torch.Tensor, rows: int, path: Path, min_cell: int = 64) -> None:
    """images: (N, C, H, W) in [-1, 1], N = rows * columns; small images are upscaled (nearest).

    One channel is shown grey; otherwise the first three channels as RGB (model-space samples such
    as undecoded latents get a preview, zero-padded when they have two channels).
    """
    n, channels, height, width = images.shape
    cols = -(-n // rows)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if channels == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    elif channels == 2:
        pixels = torch.cat([pixels, torch.zeros_like(pixels[:, :1])], dim=1)
    pad = 2
    grid = np.full((rows * (height + pad) + pad, cols * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (height + pad), pad + c * (width + pad)
        grid[top : top + height, left : left + width] = pixels[i, :3].permute(1, 2, 0).numpy()
    image = Image.fromarray(grid)
    scale = max(1, min_cell // max(height, width))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    image.save(path)


def save_loss_curve(steps: list[int], losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=0.6, alpha=0.4, label="per step")
    if len(losses) >= 20:
        window = max(10, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- video


FF_QP2LAMBDA = 118  # FFmpeg's scale between quantiser values and `global_quality`


def _atomic_write(path: Path, write) -> None:
    """Call write(temp_path) on a temporary file beside `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames with T >= 1, got {frames.dtype} {frames.shape}")
    return frames


def _video_encoder() -> str:
    """libx264 where this FFmpeg build has it, else the always-built-in mpeg4."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # UnknownCodecError and friends differ between PyAV versions
        return "mpeg4"


def write_video(frames: np.ndarray, path: Path, fps: float, codec: str | None = None) -> None:
    """(T, H, W, 3) uint8 frames -> an MP4 (H.264, yuv420p; mpeg4 without libx264), written atomically.

    yuv420p needs even sizes: odd heights or widths are padded by repeating the last row / column.
    `codec` (None: libx264 if available) is for tests of the fallback.
    """
    import av

    frames = _check_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps={fps} must be positive")
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    codec = codec or _video_encoder()

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "17"}
            else:  # constant quantiser 2 (of 1..31): near-lossless, like `ffmpeg -q:v 2`
                stream.codec_context.qscale = True
                stream.codec_context.global_quality = 2 * FF_QP2LAMBDA
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)

    _atomic_write(path, write)


def write_gif(frames: np.ndarray, path: Path, fps: float) -> None:
    """(T, H, W, 3) uint8 frames -> an endlessly looping GIF, written atomically.

    GIF delays are whole centiseconds, so the frame rate is approximate; Pillow merges consecutive
    identical frames into one longer frame.
    """
    frames = _check_frames(frames)
    if not fps > 0:
        raise ValueError(f"fps={fps} must be positive")
    images = [Image.fromarray(array) for array in frames]

    def write(tmp: Path) -> None:
        images[0].save(
            tmp,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=max(20, round(1000 / fps)),
            loop=0,
        )

    _atomic_write(path, write)


def video_grid(videos: torch.Tensor, rows: int, upscale: int = 1, pad: int = 1) -> np.ndarray:
    """videos: (N, C, T, H, W) in [-1, 1] -> (T, H', W', 3) uint8 frames of a grid, row-major, `rows` rows.

    Channels are shown like `save_image_grid`: one is grey, two get a zero third channel, otherwise
    the first three are RGB. Each clip is upscaled `upscale` times (nearest); the gaps are white.
    """
    if videos.ndim != 5:
        raise ValueError(f"expected (N, C, T, H, W) videos, got shape {tuple(videos.shape)}")
    if rows < 1 or upscale < 1 or pad < 0:
        raise ValueError(f"rows={rows} and upscale={upscale} must be >= 1 and pad={pad} >= 0")
    n, channels, frames, height, width = videos.shape
    cols = max(1, -(-n // rows))
    pixels = ((videos.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if channels == 1:
        pixels = pixels.expand(-1, 3, -1, -1, -1)
    elif channels == 2:
        pixels = torch.cat([pixels, torch.zeros_like(pixels[:, :1])], dim=1)
    pixels = pixels[:, :3].permute(0, 2, 3, 4, 1)  # (N, T, H, W, 3)
    if upscale > 1:
        pixels = pixels.repeat_interleave(upscale, dim=2).repeat_interleave(upscale, dim=3)
    cell_h, cell_w = height * upscale, width * upscale
    grid = np.full((frames, rows * (cell_h + pad) + pad, cols * (cell_w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        top, left = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        grid[:, top : top + cell_h, left : left + cell_w] = pixels[i].numpy()
    return grid


def save_video_grid(
    videos: torch.Tensor, rows: int, stem: Path, fps: float, upscale: int | None = None
) -> dict[str, Path]:
    """Write the grid of `videos` as <stem>.mp4 and <stem>.gif; returns {"mp4": path, "gif": path}.

    upscale=None picks the smallest integer factor that makes a clip's shorter side at least 64 px.
    """
    if upscale is None:
        upscale = max(1, -(-64 // min(videos.shape[-2:])))
    frames = video_grid(videos, rows, upscale=upscale)
    stem = Path(stem)
    paths = {"mp4": stem.parent / f"{stem.name}.mp4", "gif": stem.parent / f"{stem.name}.gif"}
    write_video(frames, paths["mp4"], fps)
    write_gif(frames, paths["gif"], fps)
    return paths
