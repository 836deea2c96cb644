"""Operations: the local service stack (PostgreSQL, Prefect server, MLflow server) without Docker.

``infra.stack`` implements ``nightshift stack up | down | status | env``.
"""
