"""sentence-transformers' trainer with the runner's learning-rate schedule over a wall-clock budget."""

from __future__ import annotations

from sentence_transformers import SentenceTransformerTrainer

from .schedules import wall_clock_scheduler


class BudgetedTrainer(SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` whose learning rate decays to zero over ``budget_minutes`` of training wall
    clock or ``max_steps``, whichever ends first (:class:`~st_bitnet.training.schedules.WallClockSchedule`);
    with ``budget_minutes=None`` it is the plain trainer. The schedule's clock is saved with the scheduler state,
    so a resumed run continues the same decay. A :class:`~.samplers.LengthGroupedBatchSampler` measures rows in the
    student's tokens.
    """

    def __init__(self, *args, budget_minutes: float | None = None, **kwargs):
        self.budget_minutes = budget_minutes
        super().__init__(*args, **kwargs)

    def get_batch_sampler(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        from .samplers import LengthGroupedBatchSampler

        if self.args.batch_sampler is LengthGroupedBatchSampler:  # measured in the student's own tokens
            return LengthGroupedBatchSampler(dataset, batch_size, drop_last, valid_label_columns, generator, seed,
                                             tokenizer=getattr(self.model, "tokenizer", None),
                                             max_length=getattr(self.model, "max_seq_length", None))
        return super().get_batch_sampler(dataset, batch_size, drop_last, valid_label_columns, generator, seed)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.budget_minutes is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.args.lr_scheduler_type != "linear":  # SchedulerType is a str enum
            raise ValueError(f"a wall-clock budget schedule is linear; lr_scheduler_type {self.args.lr_scheduler_type} "
                             "cannot be combined with training.decay_over_time_budget")
        self.lr_scheduler = wall_clock_scheduler(
            optimizer or self.optimizer, self.args.get_warmup_steps(num_training_steps), num_training_steps,
            self.budget_minutes)
        self._created_lr_scheduler = True
        return self.lr_scheduler
