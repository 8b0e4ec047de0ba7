"""Pretraining and fine-tuning (`draftlm pretrain`, `draftlm finetune`): one trainer loop
(`trainer`), its recipe dataclass (`config`), checkpoints with exact resume
(`checkpoint`), metrics and loss curves (`metrics`) and torchrun DDP/FSDP (`distributed`).
"""
