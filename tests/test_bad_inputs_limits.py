"""Bad inputs outside the tables: a bad MOREFT_TRITON, a 5 MB line, a backtracking regex."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch
from tiny import SUBPROCESS_ENV

import moreft


def test_a_bad_moreft_triton_breaks_only_the_commands_that_run_layers():
    env = {**SUBPROCESS_ENV, "MOREFT_TRITON": "sometimes"}
    ok = subprocess.run(
        [sys.executable, "-m", "moreft", "--version"], env=env, capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0 and ok.stdout.startswith("moreft "), ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "moreft", "train", "--task", "sentiment", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr.strip()
        == "moreft: error: MOREFT_TRITON='sometimes' must be one of ('auto', 'off', 'on') (or 0/1)"
    )


def test_a_5_mb_line_is_clipped_before_tokenising(tmp_path):
    """Peak memory of tokenising one 5 MB text, in a fresh process (before: ~700 MB for the whole line)."""
    code = (
        "import resource, sys\n"
        "from transformers import AutoTokenizer\n"
        "from moreft.models import minilm_dir\n"
        "from moreft.tasks import PromptExample, TextExample\n"
        "from moreft.train.data import encode_classification, encode_generation\n"
        "tok = AutoTokenizer.from_pretrained(minilm_dir())\n"
        "encode_classification([TextExample(0, 'warm up', 0)], tok, 128)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "text = 'a gripping, funny film ' * 230_000\n"
        "items = encode_classification([TextExample(0, text, 1)], tok, 128).items\n"
        "gen = encode_generation([PromptExample(1, text, ' ' + text)], tok, 128).items\n"
        "grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024\n"
        "print(len(text), len(items[0]['input_ids']), len(gen[0]['input_ids']), grew)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    chars, n_cls, n_gen, grew_mib = out.stdout.split()
    assert int(chars) > 5 * 10**6 and int(n_cls) == 128 and int(n_gen) == 128
    assert float(grew_mib) < 64, f"tokenising one 5 MB line grew the peak RSS by {grew_mib} MiB"


def test_a_backtracking_regex_is_stopped_in_the_library(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["moreft.targets"], "MATCH_SECONDS", 0.2)
    net = torch.nn.Sequential()
    net.add_module("a" * 40, torch.nn.Linear(4, 4))
    began = time.perf_counter()
    with pytest.raises(moreft.TargetError, match=r"took more than 0\.2 s to match 1 module names"):
        moreft.inject(net, moreft.LoRAConfig(target_modules="(a|aa)+c"))
    assert time.perf_counter() - began < 5 and not moreft.adapter_layers(net)
