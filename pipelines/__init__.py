"""prognode pipelines: small typed stages composed into named pipelines.

Importing this package, or :mod:`pipelines.registry`, must not import torch or monai.
"""
