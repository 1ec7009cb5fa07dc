"""The offline pipeline: one module per stage, a config module and a small caching runner."""
