"""``moreft bench``: training-step speed and memory of adapted linear layers, merging, and a real fine-tune.

    moreft bench                       # three layer shapes + merge (12-17 min on a busy 2-core CPU)
    moreft bench --quick               # one shape, few rounds, 2048² merge (about a minute)
    moreft bench --e2e --out b.json    # plus steps/s and peak RSS of a MiniLM fine-tune
    python -m moreft.bench ...         # the same

The layer benchmark times ``layer(x).backward(g)`` (x requires grad, base frozen, fp32) for the
frozen base alone, moreft's LoRA / MoRe / MoRA and HF peft's LoRA and BOFT, interleaved in one
process (see :mod:`moreft.bench.measure` for the statistics and the memory method). Results are
printed as tables and, with ``--out``, written as JSON.
"""

from __future__ import annotations

from .cli import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
