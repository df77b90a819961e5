"""The verbs beyond run and evaluate, built on the API and the pipeline: tune, refresh, pack."""
