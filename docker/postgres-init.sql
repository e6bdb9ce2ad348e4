-- Runs once, when the postgres volume is created: a second database for MLflow beside Prefect's.
CREATE DATABASE mlflow;
