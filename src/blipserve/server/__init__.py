"""The HTTP server: Azure ML, MLflow and OpenAI contracts over one scheduler."""
