"""Engines that run the same ServerApp/ClientApp on one machine: ``inprocess`` (default) and ``ray``."""
