"""Small model fixtures shared by the command line, the tests and the benchmarks."""

from memengine.models.gpt import GPT, Block
from memengine.models.mlp import MlpBlock

__all__ = ["GPT", "Block", "MlpBlock"]
