"""The image-classification recipe: the shared sections plus IDX data, image cleaning, augmentation
by shifts and rotations, and the image model. Text-only knobs (``tokenizer``, text ``clean`` rules,
``augment.operations``) are unknown keys here, so a recipe that sets them fails loudly."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from models.vision import ImageModelConfig
from tasks.core.config import DataSource, RecipeBase, Section, train_section_for


class ImageDataConfig(DataSource):
    """Where the IDX image and label files are."""

    format: Literal["idx"] | None = Field(default=None, description="File format: idx (MNIST's), gzipped or not.")
    train_labels_path: str | None = Field(
        default=None,
        description="IDX labels file of train_path. Null derives it from the images file name "
        "('train-images-idx3-ubyte.gz' -> 'train-labels-idx1-ubyte.gz', in the same folder).",
    )
    test_labels_path: str | None = Field(
        default=None,
        description="IDX labels file of test_path. Null derives it from the images file name "
        "('t10k-images-idx3-ubyte.gz' -> 't10k-labels-idx1-ubyte.gz', in the same folder).",
    )


class ImageCleanConfig(Section):
    """Image row filters (blank images are always dropped); every dropped row goes to rejects with its reason."""

    dedupe: bool = Field(default=True, description="Drop exact duplicates (identical pixels and label), keeping the first.")
    drop_conflicts: bool = Field(default=True, description="Drop every image whose pixels appear with more than one label.")


class ImageAugmentConfig(Section):
    """Seeded random shifts and small rotations of train images; originals are kept."""

    enabled: bool = Field(default=False, description="Add augmented copies of train images.")
    copies: int = Field(default=1, ge=1, le=16, description="Augmented copies per original image.")
    shift_px: int = Field(default=2, ge=0, le=8, description="Largest random shift in whole pixels, along each axis.")
    rotate_deg: float = Field(default=10.0, ge=0, le=45, description="Largest random rotation in degrees, either way.")
    seed: int = Field(default=13, description="Seed of the augmentation.")


class ImageRecipe(RecipeBase):
    """An image-classification recipe (MNIST-style greyscale digits)."""

    task: Literal["image-classification"] = Field(description="What the model predicts.")
    data: ImageDataConfig
    clean: ImageCleanConfig = Field(default_factory=ImageCleanConfig, description="Cleaning rules.")
    augment: ImageAugmentConfig = Field(default_factory=ImageAugmentConfig, description="Augmentation settings.")
    model: ImageModelConfig = Field(default_factory=ImageModelConfig, description="The image model: document, variant or cnn.")

    @model_validator(mode="before")
    @classmethod
    def _train_defaults(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and (raw.get("train") is None or isinstance(raw.get("train"), dict)):
            return {**raw, "train": train_section_for("scratch", raw.get("train"))}
        return raw
