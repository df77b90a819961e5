"""Pure torch, the part that decides every number: how a model is prepared and converted (flow),
what each observer observes (sites), the workers' probes and calibration worker, the driver's
merges, the merge modes and their one protocol, activation range methods, evaluation scores and
per-layer SQNR. Never imports Ray, the cluster, the pipeline, storage or commands."""
