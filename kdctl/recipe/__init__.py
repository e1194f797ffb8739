"""Recipes: one typed tree (:mod:`~kdctl.recipe.sections`), loaded from YAML with ``extends`` and
``--set`` (:mod:`~kdctl.recipe.files`, :mod:`~kdctl.recipe.load`), one-line errors
(:mod:`~kdctl.recipe.messages`) and the teacher/student pair checks (:mod:`~kdctl.recipe.pairs`).

This package file only re-exports the names callers use (``from kdctl.recipe import Recipe,
load_recipe``); its modules import each other directly, never this file. No torch is imported.
"""
from kdctl.errors import RecipeError
from kdctl.recipe.catalog import families
from kdctl.recipe.detectors import (
    FAMILY_SECTIONS, SECTION_TAGS, DetectorSection, FCOSDetectorConfig, YoloDetectorConfig, detector_config,
)
from kdctl.recipe.files import apply_override, builtin_recipes, deep_merge, find_recipe, load_raw, recipes_dir
from kdctl.recipe.load import load_recipe, validate_raw
from kdctl.recipe.pairs import DECODING_VARIANT, crosses_families, output_methods, pair_problem
from kdctl.recipe.sections import (
    METHOD_NAMES, Adapter, AugmentConfig, CrossKDLoss, DataConfig, DetectorConfig, DistillConfig, DistillLoss, EMAConfig,
    EvalConfig, FeatureLoss, MimicLoss, ModelConfig, Recipe, RuntimeConfig, Section, ShapesConfig, SSIMLoss,
    TrainConfig, VariantConfig, YoloConfig, on_off,
)

__all__ = [
    "RecipeError", "families", "apply_override", "builtin_recipes", "deep_merge", "find_recipe", "load_raw",
    "recipes_dir", "load_recipe", "validate_raw", "DECODING_VARIANT", "output_methods", "crosses_families",
    "pair_problem", "METHOD_NAMES", "Recipe", "on_off", "Section", "ShapesConfig", "AugmentConfig", "DataConfig",
    "VariantConfig", "YoloConfig", "DetectorConfig", "ModelConfig", "Adapter", "CrossKDLoss", "SSIMLoss", "FeatureLoss",
    "MimicLoss", "DistillLoss", "DistillConfig", "EMAConfig", "TrainConfig", "EvalConfig", "RuntimeConfig",
    "FAMILY_SECTIONS", "SECTION_TAGS", "DetectorSection", "FCOSDetectorConfig", "YoloDetectorConfig", "detector_config",
]
