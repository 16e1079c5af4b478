"""Integrations of ringattn with other libraries; each submodule imports its library lazily.

- :mod:`ringattn.integrations.hf`: Hugging Face ``transformers`` (``pip install ringattn[hf]``).
"""
