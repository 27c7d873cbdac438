"""``moreft bench``: training-step speed and memory of adapted linear layers, merging, and a real fine-tune.

    moreft bench                       # three layer shapes + merge (12-17 min on a busy 2-core CPU)
    moreft bench --quick               # one shape, few rounds, 2048² merge (about a minute)
    moreft bench --e2e --out b.json    # plus steps/s and peak RSS of a MiniLM fine-tune
    moreft bench --compile --inference # plus torch.compile'd variants and forward-only inference
    moreft bench --llm-only            # SmolLM2-135M, all linear layers, ours and peft's peers, fp32 + bf16
    moreft bench --full --out all.json # everything above in one run (hours on 2 cores)
    python -m moreft.bench ...         # the same

The layer benchmark times ``layer(x).backward(g)`` (x requires grad, base frozen, fp32) for the
frozen base alone, moreft's LoRA / MoRe / MoRA (every operator) and HF peft's LoRA and BOFT, interleaved in one
process (see :mod:`moreft.bench.measure` for the statistics and the memory method). Results are
printed as tables and, with ``--out``, written as JSON.

The flags and the driver are :mod:`moreft.cli.bench`; the modules here measure: :mod:`.variants`
(what is timed), :mod:`.measure` (how), :mod:`.layer`, :mod:`.e2e`, :mod:`.llm`, :mod:`.report`.
"""
