"""Renderers: text for people (rich), JSON for machines, and the one output-file writer."""
