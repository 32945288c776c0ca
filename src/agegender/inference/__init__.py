"""The trained model applied: the predictor every caller shares, the exports to other runtimes,
and the MLflow pyfunc model."""
