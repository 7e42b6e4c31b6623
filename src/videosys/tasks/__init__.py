"""Tasks: train, sample, bench and preprocess. Each takes the typed sub-configs it needs, never the whole config."""

from videosys.tasks.bench import BenchTaskConfig, bench
from videosys.tasks.common import RunContext
from videosys.tasks.preprocess import PreprocessTaskConfig, preprocess
from videosys.tasks.sample import SampleTaskConfig, sample
from videosys.tasks.tracking import ConsoleLoggerConfig, WandbLoggerConfig, build_tracker
from videosys.tasks.train import OptimizerConfig, TrainTaskConfig, train

__all__ = [
    "BenchTaskConfig",
    "ConsoleLoggerConfig",
    "OptimizerConfig",
    "PreprocessTaskConfig",
    "RunContext",
    "SampleTaskConfig",
    "TrainTaskConfig",
    "WandbLoggerConfig",
    "bench",
    "build_tracker",
    "preprocess",
    "sample",
    "train",
]
