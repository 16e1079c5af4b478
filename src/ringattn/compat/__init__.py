"""Drop-in call signatures of other context-parallel attention libraries, on ringattn.

Existing code changes one import and keeps its calls:

- :mod:`ringattn.compat.ring_flash_attn`: ring-flash-attention's ``ring_flash_attn_func``,
  ``zigzag_ring_flash_attn_func``, ``stripe_flash_attn_func``, their ``*_kvpacked_func`` /
  ``*_qkvpacked_func`` forms, the ``*_varlen_func`` forms and ``llama3_flash_attn_varlen_func``
  (``from ring_flash_attn import ...`` becomes ``from ringattn.compat.ring_flash_attn import ...``).
- :mod:`ringattn.compat.yunchang`: yunchang's ``set_seq_parallel_pg``, ``LongContextAttention``,
  ``LongContextAttentionQKVPacked``, ``EXTRACT_FUNC_DICT`` and ``AttnType``: Ulysses x ring
  (``sp_ulysses_degree`` x ``sp_ring_degree``, both placements, data-parallel replicas).

Every call is exact (the same results as single-device attention, as ``ring_attention``), takes
its arguments in the other library's conventions — ``(batch, seq, heads, head_dim)``,
``softmax_scale``, ``window_size=(left, right)`` with ``-1`` unbounded, ``alibi_slopes``,
``return_attn_probs`` — and refuses what it cannot honour with an error that names the argument.
``import ringattn`` does not import this package; see ``docs/compat.md`` for the full mapping.
"""

__all__ = ["ring_flash_attn", "yunchang"]
