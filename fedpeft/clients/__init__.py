"""Flower ClientApp: receive the global adapter, train locally, send the encoded delta."""
