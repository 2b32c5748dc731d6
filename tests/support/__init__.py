"""Test support shared by the integration and fault suites: worker processes, a broker-side
caller and event capture, and the end-to-end checker."""
