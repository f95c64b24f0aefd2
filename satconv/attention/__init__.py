"""Attention mechanisms, one module each, behind one interface (:class:`AttentionBase`).

Paper symbols (arXiv 1911.03584) and their names in the code:

============================  =====================  =======================================
paper                         code                   shape / meaning
============================  =====================  =======================================
``N_h``                       ``num_heads``          number of heads
``D_h``                       ``head_dim``           per-head value size (``dim`` = concat)
``D_in`` / ``D_out``          ``dim`` / ``out_dim``  channels in and out
``T = W·H`` (``N``)           ``N``                  number of pixels (tokens)
``delta = k - q``             ``relative_offsets``   key minus query, ``(N, N, 2)``
``Delta^(h)``                 ``attention_centers``  quadratic head centres, ``(num_heads, 2)``
``alpha^(h)``                 ``alpha``              quadratic precision, ``= spread**2 / 2``
``r_delta``                   row/col embeddings     learned relative encodings
============================  =====================  =======================================

Axis vocabulary used in shape comments: ``B`` batch, ``H`` heads, ``N`` tokens (``height*width``),
``D`` channels, ``Dh`` head size.

Every mechanism takes ``x: (B, height, width, dim)`` and returns ``(B, height, width, out_dim)``,
or ``(out, probs)`` with ``probs: (B or 1, heads, N, N)`` when ``return_attention=True``.
:data:`ATTENTION` maps the YAML name (``model.attention.kind``) to the class.
"""
from .base import AttentionBase
from .positions import relative_index, relative_offsets
from .content import ContentAttention
from .fcvit import FCViTTokenMixer
from .learned_relative import LearnedRelativeAttention
from .quadratic import QuadraticAttention, no_decay_param_groups
from .san import SANPairwiseAttention, SANPatchwiseAttention
from .routes import DENSE_ROUTES, EXPLICIT, SHARED_ROUTES, Routes, routes_of, set_routes, using_routes
from .sasa import SASAAttention

#: YAML name -> class.  Constructor keywords beyond the common ones come from the matching
#: options section of :class:`satconv.config.AttentionConfig`.
ATTENTION = {
    "quadratic": QuadraticAttention,
    "learned_relative": LearnedRelativeAttention,
    "content": ContentAttention,
    "san_pairwise": SANPairwiseAttention,
    "san_patchwise": SANPatchwiseAttention,
    "sasa": SASAAttention,
    "fcvit": FCViTTokenMixer,
}

__all__ = [
    "ATTENTION", "AttentionBase", "DENSE_ROUTES", "SHARED_ROUTES", "EXPLICIT", "Routes", "routes_of", "set_routes",
    "using_routes", "relative_index", "relative_offsets",
    "ContentAttention", "FCViTTokenMixer",
    "LearnedRelativeAttention", "QuadraticAttention", "no_decay_param_groups", "SANPairwiseAttention",
    "SANPatchwiseAttention", "SASAAttention",
]
