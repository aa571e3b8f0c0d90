"""Test support: scripted servers and helpers shared by unit, integration and end-to-end tests."""
