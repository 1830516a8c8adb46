"""Training for the accuracy study: a small ViT and ASTRA codebooks (NAQ, DCT) on an offline dataset.

Stands on models and methods (and comm to evaluate through the real ranks); nothing in the
runtime imports it: datasets reach nodes through testbed.models.datasets.
"""
