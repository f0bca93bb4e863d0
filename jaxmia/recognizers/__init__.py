"""Recognizers: the models, their training, the defences, imports of outside weights."""
