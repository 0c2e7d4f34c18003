"""Training, backend-neutral: cached uint8 inputs (data), the network of a run (network), the phase plan
(phases), devices, the trainee and the loop, the frozen-encoder embedding cache (embeddings) and the
linear probe on it (linear_head), and the run itself (run). The task objects and the augmentation
layer are one layer down (``covidcxr.tasks``, ``covidcxr.augment``)."""
