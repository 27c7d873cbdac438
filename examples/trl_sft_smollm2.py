"""TRL's SFTTrainer with a MoRe adapter on SmolLM2-135M-Instruct (packaged; nothing downloaded).

    python examples/trl_sft_smollm2.py OUT_DIR [STEPS]

Trains a MoRe adapter on q/k/v/o for STEPS steps on small arithmetic question/answer texts, saves
it with ``trainer.save_model`` (peft's layout) and checks that ``PeftModel.from_pretrained``
reproduces the trained model's logits.
"""

import random
import sys

import peft
import torch
import trl
from datasets import Dataset

import moreft
from moreft.models import load_model

out, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
rng = random.Random(0)
texts = [f"Q: what is {a} plus {b}? A: {a + b}." for a, b in ((rng.randint(1, 50), rng.randint(1, 50))
                                                              for _ in range(64))]
model, tok = load_model("smollm2", "generation")
config = moreft.MoReConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], nblocks=4, block_rank=4)
args = trl.SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=4e-3,
                     report_to=[], use_cpu=True, bf16=False, logging_steps=5, save_strategy="no", max_length=32,
                     dataset_text_field="text")
trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tok, peft_config=config)
trainer.model.print_trainable_parameters()
trainer.train()
losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
print("loss by 5 steps:", [round(float(x), 3) for x in losses])
trainer.save_model(out + "/adapter")
trainer.model.eval()
base, _ = load_model("smollm2", "generation")
loaded = peft.PeftModel.from_pretrained(base, out + "/adapter").eval()
ids = tok(texts[:2], return_tensors="pt", padding=True)
with torch.no_grad():
    diff = (loaded(**ids).logits - trainer.model(**ids).logits).abs().max()
print(f"reloaded adapter: max |logit difference| = {float(diff):.2e}")
