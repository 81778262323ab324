"""incrkern optimizers in a transformers Trainer: train, checkpoint, resume.

A tiny BERT built from a config (no download). Skipped without transformers."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install incrkern[finetune])")

import incrkern  # noqa: E402
from incrkern.finetune import fish_mask  # noqa: E402


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32, num_labels=2,
                                     hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=32, length=12):
        g = torch.Generator().manual_seed(4)
        self.ids = torch.randint(1, 100, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()  # learnable from the first token

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def trainer_for(model, masks, out, steps):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8,
        save_steps=2, save_strategy="steps", logging_steps=1, report_to=[], use_cpu=True,
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    opt = incrkern.optim.AdamW(model.parameters(), lr=1e-2, mask=masks)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    return transformers.Trainer(model=model, args=args, train_dataset=Rows(),
                                optimizers=(opt, sched))


def calibration_masks(model):
    rows = Rows()
    batches = [{k: v[i:i + 8] for k, v in
                {"input_ids": rows.ids, "labels": rows.labels}.items()} for i in (0, 8)]
    return fish_mask(model, batches, lambda b: model(**b).loss, 0.05)


def test_trainer_trains_saves_and_resumes(tmp_path):
    model = tiny_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = calibration_masks(model)
    trainer = trainer_for(model, masks, tmp_path / "straight", 4)
    trainer.train()
    changed = sum(int((p.detach() != start[n]).sum()) for n, p in model.named_parameters())
    assert 0 < changed <= sum(m.numel() for m in masks.values())
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert all("indices" in s for s in saved["state"].values())

    # resume from step 2 with a fresh model and optimizer: the same end
    resumed = tiny_bert()
    trainer2 = trainer_for(resumed, calibration_masks(resumed), tmp_path / "straight", 4)
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
