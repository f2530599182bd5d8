"""The local full stack: Ray head, S3 endpoint and MLflow server on 127.0.0.1."""
