"""GPU tests reuse the integration suite's model fixture."""

from tests.integration.conftest import model_dir  # noqa: F401 - a fixture, found by name
