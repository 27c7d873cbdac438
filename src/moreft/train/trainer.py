"""``transformers.Trainer`` specialised for moreft adapters, and the callbacks a run uses.

:class:`AdapterTrainer` changes three things and keeps the rest of the Trainer (distribution
with torchrun / accelerate, schedules, accumulation, mixed precision, checkpoint rotation,
resumption with optimizer, scheduler, RNG and data-order state):

* checkpoints hold the adapter (``checkpoint-N/adapter/``, the :func:`moreft.save_adapter`
  format, or peft's ``save_pretrained`` for a peft arm) instead of the full model weights, and
  resuming (or ``best_checkpoint``'s load of the best one at the end) loads it back (full
  fine-tuning, which has no adapter, checkpoints ``checkpoint-N/model.safetensors``:
  :mod:`moreft.train.weights`);
* evaluation scores the task metric with :mod:`moreft.train.evaluate` (argmax labels, or greedy
  generation) on fixed example sets instead of the Trainer's logits-based loop;
* logs go to ``metrics.jsonl`` and a compact progress bar.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import moreft
from moreft.errors import CheckpointError
from moreft.safe_write import atomic_write_text
from moreft.train import peft_arm
from moreft.train.checkpoints import check_optimizer_files
from moreft.train.weights import FULL_WEIGHTS_FILE, load_full_weights, save_full_weights

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"


class AdapterTrainer(Trainer):
    """A Trainer that checkpoints only the adapter and evaluates with a task scorer.

    Args:
        *args: As for :class:`transformers.Trainer`.
        score: ``score(examples) -> {metric: value}`` used by :meth:`evaluate`.
        eval_sets: Example sets by metric prefix, e.g. ``{"eval": validation, "test": test}``.
        full_weights: Full fine-tuning: checkpoints hold the whole model, not an adapter.
        **kwargs: As for :class:`transformers.Trainer`.
    """

    def __init__(
        self,
        *args: Any,
        score: Callable[[Sequence[Any]], dict[str, float]],
        eval_sets: Mapping[str, Sequence[Any]],
        full_weights: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault(
            "eval_dataset", list(eval_sets.get("eval", ()))
        )  # only so that Trainer accepts eval_steps
        super().__init__(*args, **kwargs)
        if not loss_uses_item_count(self.accelerator.unwrap_model(self.model)):
            # A classification head's loss is a plain batch mean that ignores ``num_items_in_batch``; left as
            # "accepting loss kwargs" the Trainer would multiply it by the process count and skip the division
            # by grad_accum, so DDP and accumulation would not match one process with the same global batch.
            self.model_accepts_loss_kwargs = False
        self.score = score
        self.full_weights = full_weights
        self.eval_sets = dict(eval_sets)
        self.last_scores: dict[str, tuple[int, dict[str, float]]] = {}
        self.raw_scores: dict[str, tuple[int, dict[str, float]]] = {}
        self.scored: dict[tuple[str, int], dict[str, float]] = {}  # (prefix, step) -> logged scores

    def _scores(self, prefix: str) -> dict[str, float]:
        """Scores of ``eval_sets[prefix]`` now; an equal set scored at this step is not scored again
        (memorisation tasks, and file tasks without a test file, test on the validation set)."""
        for other, (step, scores) in self.raw_scores.items():
            if (
                other != prefix
                and step == self.state.global_step
                and self.eval_sets[other] == self.eval_sets[prefix]
            ):
                return scores
        scores = self.score(self.eval_sets[prefix])
        self.raw_scores[prefix] = (self.state.global_step, scores)
        return scores

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Score ``eval_sets[metric_key_prefix]``, log ``<prefix>_<metric>`` and fire ``on_evaluate``.

        Raises:
            KeyError: ``metric_key_prefix`` names no example set.
        """
        if metric_key_prefix not in self.eval_sets:
            raise KeyError(f"no example set {metric_key_prefix!r}; have {sorted(self.eval_sets)}")
        step, cached = self.last_scores.get(metric_key_prefix, (-1, {}))
        if step != self.state.global_step:  # the same step is not scored twice (periodic + final)
            scores = self._scores(metric_key_prefix)
            cached = {f"{metric_key_prefix}_{k}": v for k, v in scores.items()}
            self.last_scores[metric_key_prefix] = (self.state.global_step, cached)
            self.scored[(metric_key_prefix, self.state.global_step)] = cached
            self.log(dict(cached))
        metrics = dict(cached)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (not the full model) into ``output_dir/adapter``; full fine-tuning writes
        the model's weights to ``output_dir/model.safetensors``."""
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        folder = Path(output_dir or self.args.output_dir)
        if self.full_weights:
            save_full_weights(model, folder / FULL_WEIGHTS_FILE, self.state.global_step)
        elif peft_arm.is_peft_model(model):
            peft_arm.save(model, folder / ADAPTER_DIR)
        else:
            moreft.save_adapter(model, folder / ADAPTER_DIR)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Load the adapter (or full weights) saved by :meth:`_save` into the (already injected) model.

        Raises:
            moreft.AdapterFileError: The checkpoint holds no adapter (or weights) that fit the model.
        """
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.full_weights:
            load_full_weights(model, Path(resume_from_checkpoint) / FULL_WEIGHTS_FILE)
        elif peft_arm.is_peft_model(model):
            peft_arm.load_weights(model, Path(resume_from_checkpoint) / ADAPTER_DIR)
        else:
            moreft.load_adapter(model, Path(resume_from_checkpoint) / ADAPTER_DIR, check_base=False)

    def _load_best_model(self) -> None:
        """``best_checkpoint``: load the adapter of the best checkpoint (``load_best_model_at_end``). The scores
        cached at this step belong to the last model: they are replaced by those logged at the best step (the
        same adapter), and any other set (test) is scored again.

        Raises:
            moreft.AdapterFileError: The best checkpoint holds no adapter that fits the model.
        """
        best = self.state.best_model_checkpoint
        if best is None:
            return
        self._load_from_checkpoint(best)
        self.last_scores.clear()
        self.raw_scores.clear()
        step = int(Path(best).name.rpartition("-")[2])
        for (prefix, at), cached in self.scored.items():
            if at == step:
                self.last_scores[prefix] = (self.state.global_step, cached)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Check the checkpoint's optimizer and scheduler state against this run's parameters, then load them.

        Raises:
            moreft.errors.CheckpointError: The state is unreadable or made for other parameters.
        """
        if checkpoint is not None and not (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            groups = [list(group["params"]) for group in self.optimizer.param_groups]
            scheduler = getattr(self, "lr_scheduler", None)
            check_optimizer_files(
                Path(checkpoint), groups, scheduler.state_dict() if scheduler is not None else None
            )
        super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        """Restore the random generators' state; a malformed ``rng_state*.pth`` is a clear error.

        Raises:
            moreft.errors.CheckpointError: The file is not an RNG state the Trainer can restore.
        """
        try:
            super()._load_rng_state(checkpoint)
        except Exception as exc:  # noqa: BLE001 - torch.load / set_state raise many types for a bad file
            raise CheckpointError(
                f"the random-generator state in checkpoint {checkpoint!r} is unreadable "
                f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})"
            ) from None


def loss_uses_item_count(model: Any) -> bool:
    """True when the model's loss divides by the Trainer's ``num_items_in_batch`` (causal-LM token losses).

    Only then does the Trainer's cross-device / accumulation rescaling give the global-batch mean.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON object as one line, in a single ``write`` (a reader never sees half a line)."""
    line = json.dumps(record, sort_keys=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object line of ``path``; anything else (a torn last line from a crash, a
    line that is not UTF-8 or not an object) is skipped."""
    if not path.is_file():
        return []
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # UnicodeDecodeError, JSONDecodeError, 5000-digit numbers
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only records with ``step <= max_step`` (a resumed run re-logs the later steps)."""
    kept = [
        r
        for r in read_jsonl(path)
        if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) <= max_step
    ]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


class AtTrainBegin(TrainerCallback):
    """Runs ``action()`` once training begins: after the Trainer has loaded (and moreft has checked) a
    checkpoint's optimizer and scheduler state, before the first step."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.action()


class MetricsLogger(TrainerCallback):
    """Append every Trainer log (loss, learning rate, eval metrics) to ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        record = {
            "step": state.global_step,
            "epoch": round(state.epoch or 0.0, 4),
            "time": round(time.time(), 3),
        }
        record.update(
            {
                ("lr" if k == "learning_rate" else k): v
                for k, v in logs.items()
                if k not in ("epoch", "total_flos") and isinstance(v, (int, float, str))
            }
        )
        append_jsonl(self.path, record)


class ProgressBar(TrainerCallback):
    """One tqdm bar over optimizer steps with the latest loss and lr; eval metrics printed above it."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero and self.enabled:
            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs and self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0.0):.2e}")
        scores = {k: v for k, v in logs.items() if k.startswith(("eval_", "test_")) and isinstance(v, float)}
        if scores:
            text = f"step {state.global_step}: " + ", ".join(f"{k}={v:.4f}" for k, v in scores.items())
            (self.bar.write if self.bar is not None else print)(text)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_callbacks(trainer: Trainer, callbacks: Sequence[TrainerCallback]) -> None:
    """Replace the Trainer's default printers with ``callbacks``."""
    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)
    for cb in callbacks:
        trainer.add_callback(cb)


def log_tensorboard_to(trainer: Trainer, folder: Path) -> None:
    """Point a ``report_to: tensorboard`` run's event files at ``folder`` (the run directory's
    ``tensorboard/``) rather than the Trainer's ``checkpoints/runs/``, unless ``$TENSORBOARD_LOGGING_DIR``
    chose a folder."""
    for callback in trainer.callback_handler.callbacks:
        if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "logging_dir", "") is None:
            callback.logging_dir = str(folder)
