"""Training, backend-neutral: cached uint8 inputs (data), augmentation on the accelerator
(augment), one object per task (tasks), the phase plan (phases), devices and the loop."""
