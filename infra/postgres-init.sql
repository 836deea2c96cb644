-- Run once by the postgres image's entrypoint (docker-entrypoint-initdb.d), on an empty data volume,
-- as the superuser POSTGRES_USER (nightshift), who then owns both databases.
-- The same two databases `nightshift stack up` creates (infra/stack.py).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;   -- MLflow's tracking and registry tables, and its basic-auth users (own alembic table)

-- Prefect's migrations use trigram indexes; pg_trgm ships with the image, create it up front.
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
