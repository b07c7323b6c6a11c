"""Self-hosted inference gateway speaking the OpenAI and Hugging Face Inference APIs."""

__version__ = "0.1.0"
