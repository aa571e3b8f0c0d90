"""The inferencer: answers the test prompts with base + adapter, and serves models (`llamaduo serve`)."""
