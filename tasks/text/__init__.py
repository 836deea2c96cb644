"""Stage implementations for ``task: text-classification``.

The kind (``kind.py``) fills every pipeline slot with the module here of the same name; each follows
the kind contract of ``tasks.core.kind``. ``predict.py`` is the inference-only predictor the served
model runs; ``loader.py`` the batching both training and serving use.
"""
