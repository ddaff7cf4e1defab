"""Shared pytest configuration; fixtures live in tests/fixtures/."""

pytest_plugins = ["tests.fixtures.pg", "tests.fixtures.storage", "tests.fixtures.kloset"]
