"""Flower ServerApp: sample clients, decode and validate replies, aggregate, checkpoint, evaluate."""
