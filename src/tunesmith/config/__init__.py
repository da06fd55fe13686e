"""The run configuration: flat LLaMA-Factory keys outside, typed sections inside.

`schema` is how a section is declared and read; the sections are `TaskArgs`, `ModelArgs`,
`AdapterArgs`, `DataArgs`, `OptimArgs`, `OutputArgs`, `SamplingSettings` and `InferenceArgs`, plus each
stage's own (declared in its module under training/stages/). Loading a YAML with every stage's keys is
`tunesmith.training.configure.load_config`, which sits above the stage registry.
"""

from tunesmith.config.data_args import DataArgs
from tunesmith.config.distributed_args import DistributedArgs
from tunesmith.config.model_args import AdapterArgs, ModelArgs
from tunesmith.config.optim_args import OptimArgs
from tunesmith.config.run_config import COMMANDS, OutputArgs, RunConfig, TaskArgs, save_config
from tunesmith.config.sampling_args import InferenceArgs, SamplingSettings

__all__ = ["AdapterArgs", "COMMANDS", "DataArgs", "DistributedArgs", "InferenceArgs", "ModelArgs", "OptimArgs", "OutputArgs",
           "RunConfig", "SamplingSettings", "TaskArgs", "save_config"]
