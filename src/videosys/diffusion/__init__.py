"""Training objectives and samplers; nothing here knows about parallelism."""

from videosys.diffusion.draws import SampleDraws
from videosys.diffusion.flow import RectifiedFlow
from videosys.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from videosys.diffusion.graphs import StepGraphs, step_graphs
from videosys.diffusion.sampling import (
    Sampler,
    SamplingConfig,
    denoise_loop,
    guided,
    make_sampler,
    sample_class_conditional,
)

__all__ = [
    "DiffusionConfig",
    "GaussianDiffusion",
    "RectifiedFlow",
    "SampleDraws",
    "Sampler",
    "SamplingConfig",
    "StepGraphs",
    "denoise_loop",
    "guided",
    "make_sampler",
    "sample_class_conditional",
    "step_graphs",
]
