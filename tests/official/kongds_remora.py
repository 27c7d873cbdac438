"""Transcription of the official ReMoRA loop (kongds/MoRA ``train.py``, ``ResetReloraCallback``).

``on_step_end`` at ``global_step % T == 0`` (and > 0): every adapted linear merges, its ``lora_A`` is
zeroed and ``mora_type`` steps through ``{1: 2, 2: 3, 3: 4, 4: 1}`` (``remora_types=4``, the
default of ``train()``) or ``{1: 2, 2: 1}``; the optimizer state is replaced by an empty
``defaultdict(dict)`` (fine-tuning), and, without ``relora_scheduler``, the scheduler's lambda (a
``functools.partial`` built by ``transformers.get_scheduler``) gets ``num_warmup_steps = 50``
(``relora_warmup_step``) and ``num_training_steps = max_steps - global_step``, ``last_epoch = 0``
and every ``base_lrs[i] = _last_lr[0]``.

:func:`learning_rates` replays that on a real ``transformers`` scheduler and returns the lr each
update runs at, the oracle for moreft's ``merge_schedule: official``.
"""

from __future__ import annotations

import torch
import transformers

CYCLE = {4: {1: 2, 2: 3, 3: 4, 4: 1}, 2: {1: 2, 2: 1}}


def learning_rates(
    scheduler_type: str,
    lr: float,
    max_steps: int,
    warmup_steps: int,
    merge_every: int,
    restart_warmup: int = 50,
) -> list[float]:
    """The lr of updates 1..max_steps under the official callback (HF Trainer order of calls)."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = transformers.get_scheduler(
        scheduler_type, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps
    )
    used = []
    for global_step in range(1, max_steps + 1):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # runs at that lr
        scheduler.step()  # Trainer: lr_scheduler.step(), then global_step += 1, then on_step_end
        if global_step % merge_every == 0 and global_step > 0:
            _, _, (_func, _args, keywords, _namespace) = scheduler.lr_lambdas[0].__reduce__()
            keywords["num_warmup_steps"] = restart_warmup
            keywords["num_training_steps"] = max_steps - global_step
            scheduler._step_count = 0
            scheduler.last_epoch = 0
            for i in range(len(scheduler.base_lrs)):
                scheduler.base_lrs[i] = scheduler._last_lr[0]
    return used
