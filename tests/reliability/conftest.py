from tests.e2e.conftest import service, service_env

__all__ = ["service", "service_env"]
