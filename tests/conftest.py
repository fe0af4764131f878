"""Fixtures shared by every test module."""
from s3_server import s3_prefix, s3_server  # noqa: F401  (the local S3 server: tests/s3_server.py)
