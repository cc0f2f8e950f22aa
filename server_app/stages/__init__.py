"""The ServerApp's stages, one module each: stage 1 (`extractor`), stage 2 (`experts`), stage 3
(`gates`), the baselines trained beside them (`baselines`) and the evaluation (`evaluation`)."""
