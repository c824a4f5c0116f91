"""The public Python API's implementation (private modules: import the names from `deltatune`)."""
