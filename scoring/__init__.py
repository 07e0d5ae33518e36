"""Calcium scoring core: CT series loading, Agatston/volume/mass scores, model and phantom."""

__version__ = "1.0.0"
