"""Training engine: the trainer, what differs per task, optimiser and schedule, and the
distributed (torchrun) set-up. Evaluation lives in :mod:`denseclip.evaluation`."""
