"""token-classification (NER): CoNLL / jsonl / parquet ingest, BIO validation, sub-word alignment with
windows, Dai & Adel augmentation, seqeval evaluation and an entity predictor with character offsets."""
