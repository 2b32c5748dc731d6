"""Test support: the service as the worker builds it (factory), and, for the integration and
fault suites, worker processes, a broker-side caller and event capture, and the end-to-end
checker."""
