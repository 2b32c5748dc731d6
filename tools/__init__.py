"""The operator's tools around the worker: the `identity-worker` command line (run, migrate,
keys, asyncapi, send, demo, dead letters).

They may use `client` and `worker`; the runtime never imports them.
"""
