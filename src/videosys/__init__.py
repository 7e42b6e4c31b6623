"""VideoSys: train and serve image and video Diffusion Transformers fast, from one Hydra config."""

__version__ = "0.1.0"
