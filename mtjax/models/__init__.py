"""Models: ResNet backbones, task heads and their multi-task composition."""

from mtjax.models import labels
from mtjax.models.multitask import MultiTaskModel, build

__all__ = ["MultiTaskModel", "build", "labels"]
