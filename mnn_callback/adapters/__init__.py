"""Thin translations of each framework's events to the monitor: Trainer, any loop, Accelerate, Lightning."""
