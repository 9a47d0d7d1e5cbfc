"""Test helpers shared across test modules: toy models and defenses, tiny command lines."""
