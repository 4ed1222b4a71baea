"""Transforms: functions from a step to a step. One transform per module."""

from ._base import applied_transforms, compose, mark, two_forms

__all__ = ["compose", "applied_transforms", "mark", "two_forms"]
