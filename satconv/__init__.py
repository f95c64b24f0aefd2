"""satconv: self-attention and convolution, executable (Cordonnier, Loukas & Jaggi, ICLR 2020, arXiv 1911.03584).

Modules: :mod:`satconv.attention` (mechanisms), :mod:`satconv.models`, :mod:`satconv.theory`
(conv -> attention), :mod:`satconv.config`, :mod:`satconv.data`, :mod:`satconv.train`,
:mod:`satconv.viz`, :mod:`satconv.bench` (benchmarks), :mod:`satconv.flops` (FLOP counting),
:mod:`satconv.dropout` (the models' dropout), :mod:`satconv.report` (the chapters' glued numbers, as text
that reads the same on every CPU).
"""
__version__ = "0.1.0"
