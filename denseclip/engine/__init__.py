"""Training engine: the :class:`~.trainer.Trainer` and its loop (``trainer``), the hooks
around each step (``hooks``), the guards around a run (``guard``), and the optimiser and
schedule (``optim``). Evaluation lives in :mod:`denseclip.evaluation`, what differs per
task in :mod:`denseclip.tasks`."""
