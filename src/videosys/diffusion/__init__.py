"""Training objectives and samplers; nothing here knows about parallelism."""

from videosys.diffusion.gaussian import DiffusionConfig, GaussianDiffusion
from videosys.diffusion.sampling import SamplingConfig, make_scheduler, sample_class_conditional

__all__ = [
    "DiffusionConfig",
    "GaussianDiffusion",
    "SamplingConfig",
    "make_scheduler",
    "sample_class_conditional",
]
