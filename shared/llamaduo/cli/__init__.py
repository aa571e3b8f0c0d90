"""The `llamaduo` command line."""

from llamaduo.cli.app import app, main

__all__ = ["app", "main"]
