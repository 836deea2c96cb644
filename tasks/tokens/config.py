"""The token-classification (NER) recipe: the shared sections plus CoNLL / jsonl / parquet reading, the
tag scheme, BIO checks, token cleaning, sub-word alignment and windows, augmentation and the encoder.

Defaults that depend on the encoder are chosen per ``model.arch`` (``tasks.core.config.ARCH_DEFAULTS``);
``model.arch`` itself defaults to ``pretrained`` for this kind (MiniLM), so a minimal recipe is
``name``, ``task`` and ``data.train_path``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from models.encoders import EncoderConfig
from tasks.core.config import (
    DataSource,
    RecipeBase,
    Section,
    ValidateConfig,
    with_arch_defaults,
)

TokenFormat = Literal["conll", "jsonl", "parquet"]
TagScheme = Literal["iob1", "iob2", "bioes"]
DEFAULT_ARCH = "pretrained"
# the columns each format names when the recipe leaves text_column / label_column out
DEFAULT_COLUMNS: dict[str, tuple[str, str]] = {"conll": ("token", "tag"), "jsonl": ("tokens", "tags"),
                                               "parquet": ("tokens", "tags")}


class TokenDataConfig(DataSource):
    """Where the tagged sentences are and how to read them (``labels``: the allowed entity types or tags)."""

    EXTENSION_FORMATS: ClassVar[dict[str, str]] = {
        ".conll": "conll", ".conllu": "conll", ".iob": "conll", ".bio": "conll", ".txt": "conll", ".tsv": "conll",
        ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet",
    }

    format: TokenFormat | None = Field(
        default=None, description="conll (column file, blank line between sentences), jsonl or parquet (list columns). "
                                  "Inferred from the extension when omitted.")
    columns: list[str] | None = Field(
        default=None, description="CoNLL: the column names in file order (default [token, tag]; CoNLL-2003: "
                                  "[token, pos, chunk, ner]).")
    text_column: str | None = Field(
        default=None, description="Column holding the tokens (default: token for CoNLL, tokens for jsonl/parquet).")
    label_column: str | None = Field(
        default=None, description="Column holding the tags (default: tag for CoNLL, tags for jsonl/parquet).")
    delimiter: str | None = Field(
        default=None, description="CoNLL field separator; null: any run of spaces or tabs.")
    has_header: bool = Field(default=False, description="Accepted for symmetry with text recipes; CoNLL files have no header and ignore it.")
    tag_scheme: TagScheme = Field(default="iob2", description="The tag scheme of the files; iob1 and bioes are converted to IOB2.")
    encoding: str = Field(default="utf-8", description="Text encoding; undecodable bytes are replaced and counted.")
    docstart: str = Field(default="-DOCSTART-", min_length=1, description="A line whose first field is this is a document marker and skipped.")

    @model_validator(mode="after")
    def _columns(self) -> TokenDataConfig:
        if self.columns is not None:
            if len(set(self.columns)) != len(self.columns):
                raise ValueError(f"data.columns has duplicate names: {self.columns}")
            if len(self.columns) < 2:
                raise ValueError("data.columns needs at least a token and a tag column")
        return self

    def columns_for(self, fmt: str) -> tuple[str, str]:
        """(token column, tag column) for ``fmt``: the configured names, else the format's defaults."""
        token, tag = DEFAULT_COLUMNS[fmt]
        return self.text_column or token, self.label_column or tag

    def conll_columns(self) -> list[str]:
        """The CoNLL column names in file order."""
        return list(self.columns) if self.columns else list(DEFAULT_COLUMNS["conll"])


class TokenValidateConfig(ValidateConfig):
    """Thresholds of the token checks (the shared ones apply to sentences) and what to do with bad BIO."""

    bio_errors: Literal["repair", "reject"] = Field(
        default="repair", description="An I-X after O or after another type: repair makes it B-X, reject drops the sentence.")
    max_bio_error_fraction: float = Field(
        default=0.05, ge=0, le=1, description="Fail when more than this fraction of sentences breaks the BIO grammar.")
    max_cut_entity_fraction: float = Field(
        default=0.05, ge=0, le=1,
        description="Fail when more than this fraction of entities would cross a window edge at tokenizer.max_length.")


class TokenCleanConfig(Section):
    """Per-token normalisation (token count and alignment preserved) and sentence filters."""

    normalize: Literal["NFKC", "NFC", "none"] = Field(default="NFKC", description="Unicode normalisation of every token.")
    lowercase: bool = Field(default=False, description="Lower-case every token.")
    max_tokens: int = Field(default=512, ge=1, description="Reject sentences with more tokens than this.")
    dedupe: bool = Field(default=True, description="Drop exact duplicates (same tokens and tags), keeping the first.")
    drop_conflicts: bool = Field(default=True, description="Drop every sentence whose tokens appear with different tags.")


class TokenTokenizerConfig(Section):
    """Sub-word tokenization of pre-split words; the scratch tokenizer is trained on train tokens only."""

    model: Literal["wordpiece", "wordlevel"] = Field(default="wordpiece", description="Scratch only: WordPiece or whole words.")
    vocab_size: int = Field(default=16000, ge=100, le=200_000, description="Scratch only: vocabulary size (at most).")
    min_frequency: int = Field(default=2, ge=1, description="Scratch only: minimum train count for a piece to enter the vocabulary.")
    lowercase: bool = Field(default=True, description="Scratch only: lower-case inside the tokenizer.")
    max_length: int = Field(default=128, ge=8, le=4096, description="Sub-tokens per window, [CLS] and [SEP] included; longer sentences are split into windows.")
    stride: int = Field(default=32, ge=0, le=2048, description="Sub-tokens of context the next window repeats from the previous one (at most).")
    label_all_tokens: bool = Field(
        default=False, description="Train every sub-token (B- becomes I- on continuation pieces) instead of only the first one.")
    word_split: Literal["whitespace", "punctuation"] = Field(
        default="whitespace",
        description="How the served model splits raw text into words: on whitespace, or also splitting punctuation off word edges.")


class TokenAugmentConfig(Section):
    """Dai & Adel (2020) augmentation of the train split; originals kept, copies flagged ``augmented``."""

    enabled: bool = Field(default=False, description="Add augmented copies of train sentences.")
    copies: int = Field(default=1, ge=1, le=16, description="Augmented copies per original sentence.")
    operations: list[Literal["mention_replacement", "token_replacement"]] = Field(
        default=["mention_replacement", "token_replacement"], min_length=1, description="Operations to draw from, one per copy.")
    p: float = Field(default=0.3, gt=0, le=1, description="Probability that a mention (or a token) is replaced.")
    seed: int = Field(default=13, description="Seed of the augmentation.")


class TokenHeadConfig(Section):
    """The per-token tagging head."""

    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout on the hidden states before the tag layer.")
    constrained_decoding: bool = Field(
        default=True, description="Decode the best tag path that obeys IOB2 (no I-X after O or another type) instead of per-word argmax.")


class TokenEvaluateConfig(Section):
    """The release gate on entity-level scores (seqeval, strict IOB2)."""

    primary_metric: Literal["f1", "precision", "recall"] = Field(default="f1", description="Metric the gate compares.")
    min_score: float = Field(default=0.3, ge=0, le=1, description="The challenger must reach this entity F1 on test.")
    max_regression: float = Field(default=0.01, ge=0, le=1, description="The challenger may fall at most this far below the re-scored champion.")
    error_samples: int = Field(default=30, ge=0, le=1000, description="Sentences with errors shown in errors.md.")


class TokenRecipe(RecipeBase):
    """A token-classification recipe: what to tag, how to train, how to release."""

    task: Literal["token-classification"] = Field(default="token-classification", description="What the model predicts.")
    data: TokenDataConfig
    validate_: TokenValidateConfig = Field(default_factory=TokenValidateConfig, alias="validate", description="Validation thresholds.")
    clean: TokenCleanConfig = Field(default_factory=TokenCleanConfig, description="Cleaning rules.")
    tokenizer: TokenTokenizerConfig = Field(default_factory=TokenTokenizerConfig, description="Tokenizer, alignment and windows.")
    augment: TokenAugmentConfig = Field(default_factory=TokenAugmentConfig, description="Augmentation settings.")
    head: TokenHeadConfig = Field(default_factory=TokenHeadConfig, description="The tagging head.")
    evaluate: TokenEvaluateConfig = Field(default_factory=TokenEvaluateConfig, description="Release gate.")
    model: EncoderConfig = Field(default_factory=lambda: EncoderConfig(arch=DEFAULT_ARCH),
                                 description="The encoder: pretrained MiniLM by default, or the scratch Transformer.")

    @model_validator(mode="before")
    @classmethod
    def _defaults_per_arch(cls, raw: Any) -> Any:
        """Pretrained unless the recipe says otherwise; the train defaults of that arch."""
        return with_arch_defaults(raw, DEFAULT_ARCH)
