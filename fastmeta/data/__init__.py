"""Tasks for meta-learning: a batch of T tasks, each a support set to adapt on and a query set to evaluate."""

from fastmeta.data.tasks import TaskBatch

__all__ = ["TaskBatch"]
