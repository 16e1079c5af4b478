"""ringattn: exact ring attention (context parallelism) for PyTorch, on CPU and CUDA.

import ringattn
mask = ringattn.create_ring_mask(seq_len, causal=True)       # once per batch
out = ringattn.ring_attention(q, k, v, mask=mask)             # every layer; q, k, v: this shard
out = ringattn.ring_attention(q, k, v, causal=True)          # one call: keywords build the mask
local = ringattn.shard(x, layout="zigzag")                    # full -> this rank's shard
full = ringattn.unshard(local, layout="zigzag")               # inverse, differentiable
pos = ringattn.positions(seq_len, layout="zigzag")            # global positions, for RoPE
mesh = ringattn.context_mesh(ulysses=2, ring=2)               # 2-D: pass group=mesh to the above
"""

from .api import padded_length, positions, ring_attention, shard, unshard
from .checks import RingInputError
from .comm import RingPeerError
from .engine import Granularity
from .inference import KVCache, merge_across_ranks
from .kernels import KERNELS, AttentionKernel
from .layout import LAYOUTS, Layout, Segment
from .masks import MaskSpec, rank_work
from .mods import alibi, alibi_slopes, prefix_lm, softcap
from .ring_mask import RingMask, create_ring_mask
from .rotation import choose_rotation
from .trace import RingProgress, RingTrace, record_ring, report_progress
from .ulysses import context_mesh, ulysses_degrees

__version__ = "0.1.0"

__all__ = [
    "KERNELS",
    "LAYOUTS",
    "AttentionKernel",
    "Granularity",
    "KVCache",
    "Layout",
    "MaskSpec",
    "RingInputError",
    "RingMask",
    "RingPeerError",
    "RingProgress",
    "RingTrace",
    "Segment",
    "alibi",
    "alibi_slopes",
    "choose_rotation",
    "context_mesh",
    "create_ring_mask",
    "merge_across_ranks",
    "padded_length",
    "positions",
    "prefix_lm",
    "rank_work",
    "record_ring",
    "report_progress",
    "ring_attention",
    "shard",
    "softcap",
    "ulysses_degrees",
    "unshard",
]
