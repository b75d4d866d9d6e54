"""Data parallelism over torch.distributed: the GradBuffer's buckets reduced during the last
micro-batch's backward (GradReducer), and ZeRO-1 shards of fp32 masters and optimizer state
(ShardedMasterOptimizer, also reached as memengine.MasterOptimizer(..., shard=True)).
memengine.Engine(model, ..., process_group=...) puts them together."""

from memengine.distributed.collectives import probe
from memengine.distributed.data_parallel import StepFailedOnAnotherRank
from memengine.distributed.reducer import GradReducer
from memengine.distributed.sharded_optimizer import ShardedMasterOptimizer, default_group

DEFAULT_BUCKET_BYTES = 32 * 2**20  # within the 25 MiB (torch DDP) to 40M-parameter (Megatron) range

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "GradReducer",
    "ShardedMasterOptimizer",
    "StepFailedOnAnotherRank",
    "default_group",
    "probe",
]
