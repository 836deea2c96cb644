"""Stage implementations for ``task: multi-task``: several tasks of other kinds on one shared encoder.

``kind.py`` fills every slot: ``prep.py`` runs each task's own kind per prep stage and combines the
outputs, ``train.py`` trains the shared encoder with one head per task (``sampling.py``, ``adapters.py``),
``evaluate.py`` has each task's own kind evaluate it and gates every task (``tasks.core.gate.gate_tasks``);
``predict.py`` is the inference-only predictor answering for every head. See docs/architecture.md, section 10.
"""
