"""Test oracles: our own transcriptions of the papers' authors' code (never imported by moreft).

Each module restates, in plain PyTorch, what one file of the authors' repository computes, with
the function and the expression it follows named in comments, so that moreft's options can be
checked against the official behaviour without the official packages (a peft-0.9 fork, a
CUDA-only research tree) being installed.

* :mod:`official.kongds_mora`: kongds/MoRA, ``peft-mora/src/peft/tuners/lora/layer.py``
  (commit a49fc1f / d0528b4): r̂, ``_apply_mora`` and ``get_delta_weight`` for ``mora_type``
  1, 2, 3, 4, 6, and ``train.py`` ``ResetReloraCallback`` (the ReMoRA cycle and schedule restart).
* :mod:`official.sprocketlab_more`: SprocketLab/sparse_matrix_fine_tuning,
  ``src/layers/monarch_linear.py`` (@89094ed) block shapes and ``src/ops/blockdiag_butterfly_multiply.py``
  (@0326bbc) ``BlockdiagButterflyMultiply.forward``.
"""
