"""Stop (or skip) a training step whose loss or gradients are NaN/Inf, before the optimizer uses them.

A non-finite loss poisons every adapter weight in one optimizer step, and every checkpoint saved
after it. :class:`NonFiniteGuard` looks at each step just before ``optimizer.step()``:

* ``stop`` (the default) raises :class:`moreft.errors.TrainingError` naming the step and the loss;
  nothing of that step is applied, so the last checkpoint on disk is the last good state;
* ``skip`` drops the step's gradients (``p.grad = None``: AdamW then leaves those parameters and
  their moments alone), counts the step in the logs as ``nonfinite_skipped`` and goes on. The
  learning-rate schedule still advances, as with a mixed-precision overflow skip.

Under torchrun every process takes the same decision (one all-reduce of a flag per step).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from moreft.errors import TrainingError
from moreft.train.choices import NonFinitePolicy
from moreft.train.rundir import newest_complete_checkpoint


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _any_across_processes(flag: bool) -> bool:
    """``flag`` OR-ed over all processes of a torch.distributed run (``flag`` itself otherwise)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class NonFiniteGuard(TrainerCallback):
    """Check every optimizer step's losses and gradients for NaN/Inf; stop or skip as ``policy`` says.

    Args:
        policy: ``"stop"`` or ``"skip"`` (a :class:`NonFinitePolicy` or its value).

    Raises:
        ValueError: ``policy`` is neither.
    """

    def __init__(self, policy: NonFinitePolicy | str = NonFinitePolicy.STOP) -> None:
        self.policy = NonFinitePolicy(policy)
        self.skipped: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._handle: Any = None

    def _record(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        loss = _loss_of(output)
        if module.training and loss is not None:
            self._losses.append(loss.detach())

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is not None and self._handle is None:
            self._handle = model.register_forward_hook(self._record)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        losses, self._losses = self._losses, []
        params = [
            p
            for group in getattr(optimizer, "param_groups", ())
            for p in group["params"]
            if p.grad is not None
        ]
        finite = [torch.isfinite(t).all() for t in (*losses, *(p.grad for p in params))]
        local = bool(finite) and not bool(torch.stack([f.to(finite[0].device) for f in finite]).all())
        if not _any_across_processes(local):
            return
        values = [float(t.float().mean()) for t in losses]
        bad_loss = next((v for v in values if not math.isfinite(v)), None)
        bad_grad = any(not bool(torch.isfinite(p.grad).all()) for p in params)
        step = state.global_step + 1
        what = (
            f"training loss {bad_loss}"
            if bad_loss is not None
            else "non-finite gradients (NaN/Inf)"
            if bad_grad
            else "a NaN/Inf loss on another process"
        )
        if self.policy is NonFinitePolicy.SKIP:
            for p in params:
                p.grad = None
            self.skipped.append(step)
            if state.is_world_process_zero:
                print(f"moreft: step {step}: {what}; the step was skipped (nonfinite: skip)", flush=True)
            return
        self.on_train_end(args, state, control)
        last = newest_complete_checkpoint(Path(args.output_dir))
        kept = (
            f"the last good checkpoint is {str(last)!r} (continue with --resume)"
            if last is not None
            else "no checkpoint was saved before it (use --save-every to keep some)"
        )
        raise TrainingError(
            f"{what} at step {step}: stopped before the optimizer applied it; {kept}. "
            "Lower --lr, use --precision fp32, or set nonfinite: skip to skip such steps"
        )

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if logs is not None and self.skipped and "loss" in logs:
            logs["nonfinite_skipped"] = len(self.skipped)
