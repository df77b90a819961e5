"""What a job reads: its FP32 model (models), its datasets by source and the deterministic sample
plan (data), Parquet image shards (shards), image transforms. Never imports Ray, the cluster, the
pipeline or commands; reads object storage only through `storage.store.Store`."""
