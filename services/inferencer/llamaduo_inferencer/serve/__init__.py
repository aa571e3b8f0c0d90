"""`llamaduo serve`: an OpenAI-compatible chat server over a local model and its PEFT adapters."""

from llamaduo_inferencer.serve.app import create_app, run_server
from llamaduo_inferencer.serve.engine import ChatEngine, ChatRequest

__all__ = ["ChatEngine", "ChatRequest", "create_app", "run_server"]
