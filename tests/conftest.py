"""Shared fixtures; each service's fixtures live in its own module."""

pytest_plugins = ["tests.fixtures_db", "tests.fixtures_hsm"]
