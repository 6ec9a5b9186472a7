"""Top-level pytest configuration: plugins must be declared here, in the root conftest."""

pytest_plugins = ["tests.pg_fixture"]
