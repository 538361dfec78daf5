"""Models: ResNet backbones, task heads and their multi-task composition."""

from mtjax.models.multitask import MultiTaskModel, build, head_scope, merge_params, split_params

__all__ = ["MultiTaskModel", "build", "head_scope", "merge_params", "split_params"]
