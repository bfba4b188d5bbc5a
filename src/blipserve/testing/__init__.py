"""Helpers for checking blipserve against the reference (transformers), shared by the tests
and the benchmarks, in the manner of ``transformers.testing_utils`` or ``torch.testing``.

- :mod:`blipserve.testing.tokenizers`: the tiny byte-level BPE tokenizer the tests train;
- :mod:`blipserve.testing.checkpoints`: tiny random BLIP-2 checkpoints written by
  transformers, in every layout blipserve loads;
- :mod:`blipserve.testing.reference`: the reference's ``generate`` as users run it, and a
  tiny random OPT decoder on both sides.

These modules import transformers, the reference implementation, so they need the test
extras (``pip install -e '.[test]'``). blipserve's runtime (the API, engine, server, batch
runner and trainers) never imports this package; importing it is for tests and benchmarks.
"""
