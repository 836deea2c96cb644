"""Stage implementations for ``task: image-classification`` (MNIST-style greyscale digits).

The flows and stage slots are the text pipeline's: each text stage's ``@task`` hands an image recipe
to the module here with the same role, and every module follows the same contract (pure functions,
a store-level ``run(recipe, <input refs>, store, force) -> StageRef`` with ``extra["metrics"]`` and
``extra["log_files"]``, rows in = rows out + rejected).

    ingest     IDX files (gzipped or not) -> canonical ``id, pixels, label`` rows
    validate   header-level facts, pixel range, label set, duplicates, leakage, label balance
    clean      blank, duplicate and conflicting images -> rejects with reasons
    split      seeded, stratified validation slice of train (and test when there is no test file)
    normalize  ("tokenize" slot) label map + pixel mean/std of the train split, stored with the model
    augment    seeded random shifts and small rotations of train images (off by default)
    train      the document's MLP, its variant or a small CNN
    evaluate   accuracy, per-class report, confusion matrix, misclassified digits, the gate

``images`` holds what they share: the pixel column's Arrow type, conversions to numpy, image keys
for duplicate detection and PNG grids of digits.
"""
