"""The text-classification recipe: the shared sections plus data reading, cleaning, the tokenizer,
augmentation and the encoder.

Defaults that depend on the encoder are chosen per ``model.arch`` (``tasks.core.config.ARCH_DEFAULTS``
and ``tokenizer.max_length``), so ``--set model.arch=pretrained`` alone gives a fine-tuning run.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from models.encoders import EncoderConfig
from tasks.core.config import DataSource, RecipeBase, Section, with_arch_defaults

TextFormat = Literal["csv", "tsv", "jsonl", "parquet"]
MAX_LENGTH_DEFAULTS = {"scratch": 64, "pretrained": 128}


class DataConfig(DataSource):
    """Where the labelled data is and how to read it."""

    EXTENSION_FORMATS: ClassVar[dict[str, str]] = {
        ".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".label": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
        ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
    }

    format: TextFormat | None = Field(
        default=None, description="File format: csv, tsv, jsonl or parquet. Inferred from the extension when omitted."
    )
    has_header: bool = Field(default=True, description="Whether csv/tsv files start with a header line.")
    columns: list[str] | None = Field(
        default=None, description="Column names for a headerless csv/tsv file, in file order."
    )
    delimiter: str | None = Field(
        default=None,
        description="Field separator for tsv-style files (default tab). Splits at most len(columns)-1 times, so the last column may contain it.",
    )
    text_column: str = Field(default="text", description="Column holding the input text.")
    label_column: str = Field(default="label", description="Column holding the label (read as a string).")
    label_pattern: str | None = Field(
        default=None,
        description="Optional regex applied to the raw label; its first group becomes the label (e.g. '^([A-Z]+):' for TREC coarse classes). Non-matching rows are rejected.",
    )
    encoding: str = Field(default="utf-8", description="Text encoding; undecodable bytes are replaced and counted.")
    label_names: dict[str, str] | None = Field(
        default=None,
        description="Names the model answers with instead of the raw labels, e.g. {'0': negative, '1': positive}; "
                    "labels left out keep their raw value.",
    )

    @model_validator(mode="after")
    def _columns_for_headerless(self) -> DataConfig:
        if self.format in ("csv", "tsv") and not self.has_header and not self.columns:
            raise ValueError("data.columns is required when data.has_header is false")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError(f"data.columns has duplicate names: {self.columns}")
        return self


class CleanConfig(Section):
    """Text normalisation and row filters; every dropped row goes to rejects with its reason."""

    lowercase: bool = Field(default=False, description="Lower-case every text.")
    strip_html: bool = Field(default=True, description="Remove HTML tags and unescape entities.")
    min_chars: int = Field(default=1, ge=0, description="Reject texts shorter than this after cleaning.")
    max_chars: int = Field(default=5000, ge=1, description="Reject texts longer than this after cleaning.")
    dedupe: bool = Field(default=True, description="Drop exact duplicates (same normalised text and label), keeping the first.")
    drop_conflicts: bool = Field(default=True, description="Drop every row whose normalised text appears with more than one label.")


class TokenizerConfig(Section):
    """Scratch encoders: a tokenizer trained on the train split only, WordPiece (default) or whole words.

    A pretrained encoder brings its own tokenizer: then only ``max_length`` applies.
    """

    model: Literal["wordpiece", "wordlevel"] = Field(
        default="wordpiece",
        description="wordpiece: unseen words are split into known pieces; wordlevel: whole words, and any word "
                    "seen fewer than min_frequency times in train (or never) becomes [UNK].",
    )
    vocab_size: int = Field(default=16000, ge=100, le=200_000, description="Vocabulary size (at most; special tokens included).")
    min_frequency: int = Field(default=2, ge=1, description="Minimum train count for a word piece (or word) to enter the vocabulary.")
    lowercase: bool = Field(default=True, description="Lower-case inside the tokenizer (BERT-uncased style).")
    max_length: int = Field(
        default=64, ge=8, le=4096,
        description="Sequences are truncated to this many tokens, [CLS] and [SEP] included (default per model.arch: scratch 64, pretrained 128).",
    )


class AugmentConfig(Section):
    """Seeded EDA-style augmentation of the train split (swap, delete, insert); originals are kept."""

    enabled: bool = Field(default=False, description="Add augmented copies of train rows.")
    copies: int = Field(default=1, ge=1, le=16, description="Augmented copies per original row.")
    p: float = Field(default=0.1, gt=0, le=0.5, description="Fraction of words touched by each operation.")
    operations: list[Literal["swap", "delete", "insert"]] = Field(
        default=["swap", "delete", "insert"], min_length=1, description="Operations to draw from, one per copy."
    )
    seed: int = Field(default=13, description="Seed of the augmentation.")


class TextRecipe(RecipeBase):
    """A text-classification recipe: what to train on, how, and how to release it."""

    task: Literal["text-classification"] = Field(default="text-classification", description="What the model predicts.")
    data: DataConfig
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Cleaning rules.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer settings.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentation settings.")
    model: EncoderConfig = Field(default_factory=EncoderConfig, description="The encoder: scratch Transformer or a pretrained checkpoint, and the pooling.")

    @model_validator(mode="before")
    @classmethod
    def _defaults_per_arch(cls, raw: Any) -> Any:
        """Fill the encoder-dependent defaults the recipe leaves out (train.*, tokenizer.max_length)."""
        return with_arch_defaults(raw, "scratch", MAX_LENGTH_DEFAULTS)
