"""The shapes world (a synthetic captioned image set) and its rule-based evaluator."""

from .evaluate import Reading, read
from .world import COLORS, SHAPES, Scene, caption, render, sample_scene, shape_mask

__all__ = ["COLORS", "SHAPES", "Reading", "Scene", "caption", "read", "render", "sample_scene", "shape_mask"]
