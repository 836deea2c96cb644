"""The model server behind ``nightshift serve``: config, the alias-following model holder, the HTTP app.

``tasks.serve`` is the command line; this package holds its parts (``config``, ``holder``, ``app``).
"""
