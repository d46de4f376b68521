"""Shared helpers for the notebooks reproducing "Rank-1 LoRAs Encode Interpretable Reasoning Signals".

Modules are nouns (``config``, ``paths``, ``organism``, ``plotting``, ``results`` ...); notebooks import
what they call. Nothing here prints: progress goes through ``logging`` and ``tqdm``.
"""

__version__ = "0.1.0"
