"""Developer tooling: private infrastructure for `make run` and `make test`."""
