"""Timeline storage: the store contract and its backends."""
