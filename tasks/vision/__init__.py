"""Stage implementations for ``task: image-classification`` (MNIST-style greyscale digits).

The kind (``kind.py``) fills every pipeline slot with the module here of the same name; each follows
the kind contract of ``tasks.core.kind`` (pure functions, a store-level ``run(recipe, <input refs>,
store, force) -> StageRef`` with ``extra["metrics"]`` and ``extra["log_files"]``, rows in = rows out +
rejected). ``predict.py`` is the inference-only predictor the served model runs.

    ingest     IDX files (gzipped or not) -> canonical ``id, pixels, label`` rows
    validate   header-level facts, pixel range, label set, duplicates, leakage, label balance
    clean      blank, duplicate and conflicting images -> rejects with reasons
    split      seeded, stratified validation slice of train (and test when there is no test file)
    encode     label map + pixel mean/std of the train split (normalisation), stored with the model
    augment    seeded random shifts and small rotations of train images (off by default)
    train      the document's MLP, its variant or a small CNN
    evaluate   accuracy, per-class report, confusion matrix, misclassified digits, the gate

``images`` holds what they share: the pixel column's Arrow type, conversions to numpy, image keys
for duplicate detection and PNG grids of digits.
"""
